"""`data.sampler: ddwa` in the Trainer (mmfusion.data.ddwa): the weights follow DDWASampler's rule from the
model's logits, and a resumed run is bitwise the uninterrupted one."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mmfusion.batch import Batch
from mmfusion.config import DDWAConfig, TrainConfig, config_from_dict
from mmfusion.data.ddwa import DDWAData
from mmfusion.data.samplers import logit_grad_norm
from mmfusion.errors import ConfigError
from mmfusion.models.contrastive import ModelOutput
from mmfusion.run import train
from mmfusion.train.trainer import Trainer

N, CLASSES = 12, 3


class ScoreTable(nn.Module):
    """Logits from a fixed table (one row per sample), so every sample's DDWA score is known in advance."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.w = nn.Parameter(torch.zeros(1))
        self.steps: list[list[int]] = []  # the indices of each forward

    def forward(self, batch: Batch) -> ModelOutput:
        self.steps.append(list(batch.meta["index"]))
        logits = self.table[batch["i"]] + 0 * self.w
        return ModelOutput(
            F.cross_entropy(logits, batch["label"]) + self.w.square().sum(), {}, logits.detach()
        )


def collate(samples):
    i = torch.tensor([s["i"] for s in samples])
    return Batch(
        {"i": i, "label": torch.tensor([s["label"] for s in samples])},
        {"i": torch.ones(len(i), dtype=torch.bool)},
    )


def test_trainer_scores_each_step_and_reweights_by_the_rule(tmp_path):
    table = torch.randn(N, CLASSES, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(N) % CLASSES
    samples = [{"i": i, "label": int(labels[i])} for i in range(N)]
    ddwa = DDWAConfig(warmup=2, update_every=2, boost=3.0, top_fraction=0.5)
    data = DDWAData(samples, collate, batch_size=4, seed=0, ddwa=ddwa)
    model = ScoreTable(table)
    cfg = TrainConfig(
        steps=6,
        batch_size=4,
        warmup_steps=0,
        device="cpu",
        precision="fp32",
        progress=False,
        log_every=1,
        checkpoint_every=6,
    )
    Trainer(model, data, cfg, tmp_path, log=lambda m: None).fit()

    sampler = data.sampler
    assert len(model.steps) == 6 and sampler.seen.sum() == 6 * 4  # every drawn sample was scored once
    assert sampler.reweights == 2  # before the draws of steps 2 and 4
    # the last reweighting (before step 4's draw) saw the samples of steps 0-3, with their known scores
    seen = sorted({i for step in model.steps[:4] for i in step})
    score = logit_grad_norm(table, labels)
    top = sorted(seen, key=lambda i: (-float(score[i]), i))[: math.ceil(0.5 * len(seen))]
    expected = torch.ones(N, dtype=torch.float64)
    expected[top] = 3.0
    assert torch.equal(sampler.weights, expected / expected.sum())
    torch.testing.assert_close(sampler.mean_scores()[seen], score[seen].double())
    with pytest.raises(ConfigError, match="data.sampler = 'ddwa' runs in one process"):
        next(data.step_batches(0, 0, rank=0, world=2, accumulation=1))


def test_a_ddwa_run_resumes_bitwise(tiny_run, tmp_path):
    cfg = config_from_dict(
        tiny_run(
            tmp_path,
            "full",
            data={"sampler": "ddwa", "ddwa": {"warmup": 1, "update_every": 2}},
            train={"steps": 6},
        )
    )
    train(cfg, log=lambda m: None)
    full = tmp_path / "full"
    shutil.copytree(full, tmp_path / "part")
    for step in (4, 6):  # as if the run had died after step 3: the step-2 checkpoint is the newest
        shutil.rmtree(tmp_path / "part" / "checkpoints" / f"step-{step:08d}")
    (tmp_path / "part" / "metrics.jsonl").write_text("")
    train(cfg.model_copy(update={"name": "part"}), resume=True, log=lambda m: None)

    last = lambda run, f: load_file(str(run / "checkpoints" / "step-00000006" / f))  # noqa: E731
    for f in ("model.safetensors", "extra.safetensors"):
        a, b = last(full, f), last(tmp_path / "part", f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    weights = last(full, "extra.safetensors")["data.weights"]
    assert weights.max() > weights.min()  # the sampler left uniform weights behind
    losses = lambda run: [json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "part") == losses(full)[2:]  # steps 3-6, resumed from the step-2 checkpoint
