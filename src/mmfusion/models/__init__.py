"""Assembled models: encoders + fusion + head."""
