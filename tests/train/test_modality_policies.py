"""Per-modality training policies: precision per encoder (T6), gradient accumulation per modality (T7) and
per-modality monitoring (S7)."""

import json
import shutil

import pytest
import torch
from torch import nn

from mmfusion.batch import Batch
from mmfusion.config import TrainConfig
from mmfusion.data.loader import ListDataset, MapData
from mmfusion.errors import ConfigError
from mmfusion.modalities.text import TextTokenizer
from mmfusion.models.contrastive import ModelOutput
from mmfusion.models.multimodal import MultiModalModel
from mmfusion.train.precision import autocast
from mmfusion.train.trainer import ModalityAccumulator, Trainer


class TwoInputs(nn.Module):
    """y = a(x_a) + b(x_b): two 'modalities' with their own parameters; b is absent from odd samples."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 1)
        self.b = nn.Linear(2, 1)

    def modality_parameters(self):
        return {"a": ["a."], "b": ["b."]}

    def forward(self, batch: Batch) -> ModelOutput:
        pred = self.a(batch["a"]).squeeze(1) + self.b(batch["b"]).squeeze(1) * batch.mask["b"]
        return ModelOutput(((pred - batch["y"]) ** 2).mean())


def collate(samples):
    stack = lambda k: torch.stack([s[k] for s in samples])  # noqa: E731
    return Batch(
        {"a": stack("a"), "b": stack("b"), "y": stack("y")},
        {"a": torch.ones(len(samples), dtype=torch.bool), "b": stack("has_b")},
    )


def toy_data(n=32, batch_size=4):
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)
    ys = xa @ torch.tensor([1.0, -2.0, 0.5]) + xb @ torch.tensor([0.7, 0.3])
    rows = [
        {"a": xa[i], "b": xb[i], "y": ys[i], "has_b": torch.tensor(i % 2 == 0)} for i in range(n)
    ]  # b present in exactly half of every batch of 4 (the sampler shuffles, so counted, not assumed)
    return MapData(ListDataset(rows), collate, batch_size, seed=0)


def cfg(**kw):
    base = dict(
        steps=4,
        batch_size=4,
        lr=0.05,
        warmup_steps=0,
        grad_clip=0.0,
        precision="fp32",
        device="cpu",
        checkpoint_every=1,
        keep_checkpoints=10,
        log_every=1,
        progress=False,
        weight_decay=0.0,
        modality_accumulation={"b": 2},
    )
    base.update(kw)
    return TrainConfig(**base)


def test_accumulator_holds_then_applies_the_mean_gradient():
    model = TwoInputs()
    acc = ModalityAccumulator(model, {"b": 2})
    assert [k for k, _, _ in acc.groups] == ["b"]
    model.b.weight.grad = torch.full_like(model.b.weight, 1.0)
    model.a.weight.grad = torch.full_like(model.a.weight, 5.0)
    acc.hold(1)  # step 1 of a 2-step window: b's gradient is held, a's untouched
    assert model.b.weight.grad is None and torch.equal(
        model.a.weight.grad, torch.full_like(model.a.weight, 5.0)
    )
    model.b.weight.grad = torch.full_like(model.b.weight, 3.0)
    acc.hold(2)  # due: (1 + 3) / 2
    assert torch.equal(model.b.weight.grad, torch.full_like(model.b.weight, 2.0))
    assert acc.buffers == {}


def test_accumulator_errors_name_the_modality():
    with pytest.raises(ConfigError, match=r"no modality 'c'.*\['a', 'b'\]"):
        ModalityAccumulator(TwoInputs(), {"c": 2})
    with pytest.raises(ConfigError, match="modality_parameters"):
        ModalityAccumulator(nn.Linear(2, 2), {"x": 2})
    with pytest.raises(ValueError, match="modality_accumulation"):
        TrainConfig(modality_accumulation={"b": 0})


def run(tmp_path, name, resume=False, **kw):
    model = TwoInputs()
    logs = []
    Trainer(model, toy_data(), cfg(**kw), tmp_path / name, log=logs.append).fit(resume=resume)
    return model, logs


def test_modality_updated_every_k_steps_and_monitored(tmp_path):
    init = TwoInputs()
    one, logs = run(tmp_path, "one", steps=1)
    assert torch.equal(one.b.weight, init.b.weight) and torch.equal(one.b.bias, init.b.bias)
    assert not torch.equal(one.a.weight, init.a.weight)
    two, _ = run(tmp_path, "two", steps=2)
    assert not torch.equal(two.b.weight, init.b.weight)
    assert any("per-modality gradient accumulation: b every 2 steps (2 tensors)" in m for m in logs)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # S7: the data mix and throughput per modality
        assert r["mix/a"] == 1.0 and 0.0 <= r["mix/b"] <= 1.0
        assert r["samples_per_s/b"] == pytest.approx(r["samples_per_s"] * r["mix/b"], rel=1e-6)
    assert sum(r["mix/b"] for r in rows) / len(rows) > 0  # b does occur


def test_resume_inside_an_accumulation_window_is_exact(tmp_path):
    full, _ = run(tmp_path, "full", steps=4)
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-00000004")
    shutil.rmtree(
        tmp_path / "part" / "checkpoints" / "step-00000002"
    )  # resume from step 3: b's gradient held
    resumed, _ = run(tmp_path, "part", resume=True, steps=4)
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)


# ---- per-modality precision (T6) ---------------------------------------------------------------------------
TEXTS = ["a small red circle", "a large blue square", "a green cross", "two shapes"]


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(TEXTS, vocab_size=48, context_length=8)


def fusion_batch(tok, b=4):
    g = torch.Generator().manual_seed(0)
    data = {
        "text": tok.encode(TEXTS[:b]),
        "audio": torch.randn(b, 64, 51, generator=g),
        "label": torch.arange(b) % 2,
    }
    mask = {"text": torch.ones(b, dtype=torch.bool), "audio": torch.tensor([True, False, True, True])}
    return Batch(data, mask)


def model_with(tok, precision):
    torch.manual_seed(0)
    return MultiModalModel(
        {"text": "tiny", "audio": "tiny"}, fusion="late", dim=16, tokenizer=tok, precision=precision
    )


def test_each_encoder_runs_in_its_own_precision_under_one_policy(tok):
    model = model_with(tok, {"text": "bf16", "audio": "fp32"})
    batch = fusion_batch(tok)
    cpu = torch.device("cpu")
    with autocast("fp32", cpu):
        model(batch)
    assert model.precision_report() == {
        "encoders.audio": "float32",
        "encoders.text": "bfloat16",
        "fusion": "float32",
        "head": "float32",
    }
    with autocast("bf16", cpu):  # the run's policy is bf16; the audio encoder opts out
        out = model(batch)
    report = model.precision_report()
    assert report["encoders.audio"] == "float32" and report["encoders.text"] == "bfloat16"
    assert report["fusion"] == "bfloat16"
    assert torch.isfinite(out.loss)
    plain = model_with(tok, {})
    with autocast("fp32", cpu):
        plain(batch)
    assert set(plain.precision_report().values()) == {"float32"}


def test_precision_keys_are_checked(tok):
    with pytest.raises(ConfigError, match=r"precision: \['image'\] are not encoders"):
        model_with(tok, {"image": "bf16"})


def test_per_modality_loss_is_the_task_loss_over_the_rows_with_that_modality(tok):
    model = model_with(tok, {})
    batch = fusion_batch(tok)
    model.eval()
    out = model(batch)
    logits, _ = model.logits(batch)
    per = torch.nn.functional.cross_entropy(logits.float(), batch["label"], reduction="none")
    torch.testing.assert_close(out.metrics["loss/text"], per.mean())
    torch.testing.assert_close(out.metrics["loss/audio"], per[batch.mask["audio"]].mean())


def test_trainer_logs_what_ran_in_which_precision(tok, tmp_path):
    model = model_with(tok, {"text": "bf16"})
    rows = [
        {"text": TEXTS[i % 4], "audio": torch.randn(64, 51), "label": i % 2, "has_audio": i % 4 != 1}
        for i in range(8)
    ]

    def collate_rows(samples):
        b = fusion_batch(tok, len(samples))
        b.data["text"] = tok.encode([s["text"] for s in samples])
        b.mask["audio"] = torch.tensor([s["has_audio"] for s in samples])
        return b

    logs = []
    data = MapData(ListDataset(rows), collate_rows, 4, seed=0)
    Trainer(model, data, cfg(steps=2, modality_accumulation={}), tmp_path / "p", log=logs.append).fit()
    line = next(m for m in logs if m.startswith("precision ("))
    assert line == (
        "precision (fp32 policy): encoders.audio=float32, encoders.text=bfloat16, fusion=float32, head=float32"
    )
    saved = json.loads((tmp_path / "p" / "precision.json").read_text())
    assert saved["ran_in"]["encoders.text"] == "bfloat16"
    last = json.loads((tmp_path / "p" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss/text", "loss/audio", "mix/audio", "samples_per_s/text"} <= set(last)
