"""Shared test settings: CPU only, fixed threads, no progress bars."""

import os

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# OpenMP threads sleep instead of spinning while they wait: on a loaded machine (CI shares its 2 cores) a
# 2-thread torch process that spins burns its time slices waiting for a descheduled peer thread. Measured
# here (a 2-thread MLP forward/backward loop): idle cores 2.9 s passive vs 2.5 s spinning; with 2 busy
# processes 7.2 s vs 12.0 s; under 3 concurrent suites the 400-step quickstart test took > 850 s spinning
# (about 3 min on idle cores). Read when torch loads OpenMP, so set before the import; subprocesses
# inherit it (tests/clirun.py sets it too).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


def tiny_run_config(out_dir, name: str, recipe: str = "task", **sections) -> dict:
    """A seconds-long run as a config dict: recipe "task" (a router fusion model on vqa: 16 px images and
    width-32 tiny encoders, 48 training samples) or "two_tower" (the contrastive model, 32 samples); 4 steps of
    batch 8, fp32 on one CPU thread, a checkpoint every 2 steps. `sections` update the top-level sections
    (e.g. train={"grad_checkpointing": True})."""
    train = {
        "steps": 4, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "precision": "fp32", "device": "cpu",
        "threads": 1, "deterministic": True, "checkpoint_every": 2, "keep_checkpoints": 5, "log_every": 1,
        "progress": False,
    }  # fmt: skip
    cfg: dict = {"name": name, "out_dir": str(out_dir), "seed": 0, "train": train}
    if recipe == "task":
        cfg["task"] = {
            "name": "vqa", "n_train": 48, "n_val": 16, "n_test": 16, "image_size": 16, "vocab_size": 64,
            "context_length": 12,
        }  # fmt: skip
        cfg["fusion_model"] = {
            "encoders": {"image": {"image_size": 16, "patch_size": 8}, "text": "tiny"},
            "dim": 16,
            "fusion": "router",
        }
    else:
        cfg["data"] = {"synthetic": {"n_train": 32, "n_val": 8, "n_test": 8}}
        cfg["model"] = {
            "embed_dim": 16,
            "text": {"vocab_size": 64, "context_length": 12, "width": 16, "depth": 1, "heads": 2},
            "image": {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "heads": 2},
        }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


@pytest.fixture(scope="session")
def tiny_run():
    """Factory fixture: tiny_run_config(out_dir, name, recipe, **sections)."""
    return tiny_run_config
