"""Evaluation tasks: each owns its metric computation and its plots."""
