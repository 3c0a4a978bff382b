"""Constrained RLHF (PPO-CS, requirement Z1, seed 000) for the unified decoder's text generation.

world.py (the alignment world and its exact judges), vocab.py (word-level sequences), scorer.py (learned
reward / cost models, JSONL labels), ppo.py (GAE, whitening, value heads, Lagrange multiplier,
cut-and-resample), trainer.py (the PPO loop), pipeline.py (`mmfusion align`: SFT -> scorers -> PPO -> run
folder).
"""
