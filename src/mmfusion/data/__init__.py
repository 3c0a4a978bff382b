"""Data: the embedded synthetic world (`synthetic`), file sources (`sources`) and batching (`loader`)."""
