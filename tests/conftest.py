"""Shared test settings: CPU only, fixed threads, no progress bars."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402

# one thread for in-process tests: tiny models on a shared 2-core machine are fastest that way, and
# results do not depend on the core count (subprocess tests set their own `train.threads`)
torch.set_num_threads(1)
