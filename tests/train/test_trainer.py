"""Trainer properties on a toy regression model: accumulation equivalence, exact resume, checkpoint fallback."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mmfusion.batch import Batch
from mmfusion.config import TrainConfig
from mmfusion.data.loader import ListDataset, MapData
from mmfusion.models.contrastive import ModelOutput
from mmfusion.train.checkpoint import latest_valid, list_checkpoints
from mmfusion.train.trainer import Trainer, lr_lambda


class Regressor(nn.Module):
    """y = w.x + b with a per-sample mean-squared error (decomposes over samples)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)
        self.drop = nn.Dropout(0.2)  # exercises the RNG state in resume

    def forward(self, batch: Batch) -> ModelOutput:
        pred = self.lin(self.drop(batch["x"])).squeeze(1)
        return ModelOutput(((pred - batch["y"]) ** 2).mean(), {"pred_mean": pred.mean().detach()})


def collate(samples):
    x = torch.stack([s["x"] for s in samples])
    return Batch(
        {"x": x, "y": torch.stack([s["y"] for s in samples])}, {"x": torch.ones(len(x), dtype=torch.bool)}
    )


def toy_data(batch_size, n=64):
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(n, 3, generator=g)
    ys = xs @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    return MapData(ListDataset([{"x": x, "y": y} for x, y in zip(xs, ys)]), collate, batch_size, seed=0)


def cfg(**kw):
    base = dict(
        steps=6,
        batch_size=4,
        lr=0.05,
        warmup_steps=2,
        grad_clip=0.0,
        precision="fp32",
        device="cpu",
        checkpoint_every=2,
        log_every=1,
        progress=False,
        deterministic=True,
        weight_decay=0.0,
    )
    base.update(kw)
    return TrainConfig(**base)


def train(tmp_path, name, resume=False, **kw):
    model = Regressor()
    model.drop.p = 0.0 if kw.pop("no_dropout", False) else 0.2
    t = Trainer(model, toy_data(kw.get("batch_size", 4)), cfg(**kw), tmp_path / name, log=lambda m: None)
    t.fit(resume=resume)
    return model


def test_accumulation_2x2_equals_batch_of_4(tmp_path):
    one = train(tmp_path, "a", accumulation=1, no_dropout=True)
    two = train(tmp_path, "b", accumulation=2, no_dropout=True)
    for p, q in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert not torch.equal(one.lin.weight, Regressor().lin.weight)  # it did train


def test_resume_is_bitwise_identical(tmp_path):
    import shutil

    full = train(tmp_path, "full", keep_checkpoints=5)
    # the same run, as if it had died after step 3: only the step-2 checkpoint survives
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    for step in (4, 6):
        shutil.rmtree(tmp_path / "part" / "checkpoints" / f"step-{step:08d}")
    resumed = train(tmp_path, "part", resume=True)
    assert not torch.equal(resumed.lin.weight, Regressor().lin.weight)
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)


def test_damaged_newest_checkpoint_falls_back(tmp_path):
    train(tmp_path, "run", steps=4)
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004"]
    weights = ckpts[-1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    messages = []
    ck = latest_valid(tmp_path / "run" / "checkpoints", messages.append)
    assert ck.step == 2
    assert "step-00000004 is damaged (model.safetensors does not match its checksum)" in messages[0]
    state = load_file(str(ck.path / "model.safetensors"))
    assert set(state) == {"lin.weight", "lin.bias"}


def test_keep_last_k(tmp_path):
    train(tmp_path, "run", steps=6, keep_checkpoints=2)
    names = [c.name for c in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step-00000004", "step-00000006"]


def test_schedule_warmup_then_cosine():
    f = lr_lambda(cfg(steps=10, warmup_steps=2, min_lr_ratio=0.1))
    assert [round(f(s), 6) for s in (0, 1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.1)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5)


def test_fp16_on_cpu_is_refused():
    from mmfusion.errors import ConfigError
    from mmfusion.train.precision import resolve_precision

    with pytest.raises(ConfigError, match="fp16 training needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))


def test_auto_precision_on_cpu(monkeypatch):
    from mmfusion.train import precision

    monkeypatch.setattr(precision, "cpu_has_amx", lambda: False)
    assert precision.resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: True)
    assert precision.resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert precision.resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_fused_adamw_makes_the_same_update_as_the_loop(tmp_path):
    from mmfusion.train.trainer import Trainer as T

    fused = train(tmp_path, "f", fused_optimizer=True, no_dropout=True)
    loop = train(tmp_path, "l", fused_optimizer=False, no_dropout=True)
    for p, q in zip(fused.parameters(), loop.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    t = T(Regressor(), toy_data(4), cfg(), tmp_path / "x", log=lambda m: None)
    assert t.optimizer.defaults["fused"] is True
    t = T(Regressor(), toy_data(4), cfg(fused_optimizer=False), tmp_path / "y", log=lambda m: None)
    assert not t.optimizer.defaults["fused"]


def test_fusable_needs_plain_float_tensors_on_one_device():
    from mmfusion.train.optim import adamw, fusable

    w = nn.Parameter(torch.ones(2, 2))
    assert fusable([w])
    assert not fusable([w, torch.ones(2, dtype=torch.int64)])
    assert not fusable([w, nn.Parameter(torch.ones(2, device="meta"))])
    assert adamw([{"params": [w]}], lr=0.1, betas=(0.9, 0.98)).defaults["fused"] is True
    assert not adamw([{"params": [w]}], lr=0.1, betas=(0.9, 0.98), fused=False).defaults["fused"]


def test_compiled_forward_trains_like_the_eager_one(tmp_path):
    eager = train(tmp_path, "e", no_dropout=True)
    compiled = train(tmp_path, "c", compile="eager", no_dropout=True)  # dynamo's graph capture, eager kernels
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    saved = load_file(str(tmp_path / "c" / "checkpoints" / "step-00000006" / "model.safetensors"))
    # the checkpoint holds the module, not the compiled wrapper
    assert set(saved) == {"lin.weight", "lin.bias"}


def test_reuse_freed_memory_is_idempotent_on_glibc():
    import platform

    from mmfusion.train.runtime import reuse_freed_memory

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert reuse_freed_memory() is expected
    assert reuse_freed_memory() is expected
