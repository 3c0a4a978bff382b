"""Shared test settings: CPU only, fixed threads, no progress bars."""

import os

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402

# one thread for in-process tests: tiny models on a shared 2-core machine are fastest that way, and
# results do not depend on the core count (subprocess tests set their own `train.threads`)
torch.set_num_threads(1)


def tiny_contrastive_model():
    """A seeded two-tower model (width 16, one block per tower, 16 px images) for unit tests, in eval mode."""
    from mmfusion.config import ModelConfig
    from mmfusion.modalities.text import TextTokenizer
    from mmfusion.models.contrastive import ContrastiveModel

    captions = [
        "a small red circle",
        "a large blue square",
        "a small green triangle",
        "a large white cross",
    ] * 4
    tok = TextTokenizer.train(captions, vocab_size=80, context_length=16)
    cfg = ModelConfig.model_validate(
        {
            "embed_dim": 16,
            "text": {"width": 16, "depth": 1, "heads": 2, "context_length": 16},
            "image": {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "heads": 2},
        }
    )
    torch.manual_seed(0)
    return ContrastiveModel(cfg, tok).eval()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Give subprocesses (tests/clirun.py) what is left of this test's pytest-timeout, less a margin."""
    import time

    import clirun

    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else float(item.config.getini("timeout") or 0)
    clirun.DEADLINE = time.monotonic() + limit - 10 if limit > 0 else None


@pytest.fixture(scope="session")
def make_tiny_model():
    """Factory fixture: call it for a fresh tiny_contrastive_model()."""
    return tiny_contrastive_model
