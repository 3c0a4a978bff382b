"""Shared test settings: CPU only, fixed threads, no progress bars."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
