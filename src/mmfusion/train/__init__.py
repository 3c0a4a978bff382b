"""Modality-agnostic training: precision, checkpoints, distribution, the loop."""
