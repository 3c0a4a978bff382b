"""The Trainer's step hooks (mmfusion.train.step_hooks): aux-loss-free MoE balancing in a run."""

import json

import pytest
import torch

from mmfusion import load_model
from mmfusion.batch import Batch
from mmfusion.config import config_from_dict
from mmfusion.errors import ConfigError
from mmfusion.models.contrastive import ModelOutput
from mmfusion.run import train
from mmfusion.train.step_hooks import StepHooks


def moe_run(tiny_run, out, name, aux_free, **train_cfg):
    kwargs = {
        "num_experts": 4,
        "top_k": 1,
        "capacity_factor": None,
        "load_balance_coef": 0.0,  # no auxiliary loss: only the bias can balance
        "aux_free_bias": aux_free,
        "bias_update_rate": 0.02,
    }
    cfg = tiny_run(out, name, fusion_model={"fusion": "moe", "fusion_kwargs": kwargs}, train=train_cfg)
    train(config_from_dict(cfg), log=lambda m: None)
    return out / name


def test_aux_free_bias_moves_in_training_and_lowers_the_load_imbalance(tiny_run, tmp_path):
    runs = {
        aux: moe_run(tiny_run, tmp_path, f"aux{aux}", aux, steps=20, checkpoint_every=20) for aux in (0, 1)
    }
    cv = {
        aux: [json.loads(r)["load_cv"] for r in (run / "metrics.jsonl").read_text().splitlines()]
        for aux, run in runs.items()
    }
    assert cv[0][0] == cv[1][0]  # the same first step (its bias update comes after it)
    late = {aux: sum(c[-10:]) / 10 for aux, c in cv.items()}
    assert late[1] < 0.8 * late[0], late  # measured: 0.49 vs 0.70
    bias = {aux: load_model(run).fusion.expert_bias for aux, run in runs.items()}
    assert torch.equal(bias[0], torch.zeros(4))
    assert bias[1].abs().min() > 0 and abs(float(bias[1].sum())) < 1e-6  # moved, and centred


def test_bias_update_sums_the_micro_batches_of_a_step(tiny_run, tmp_path):
    one = moe_run(tiny_run, tmp_path, "one", 1, steps=1, checkpoint_every=1)
    two = moe_run(tiny_run, tmp_path, "two", 1, steps=1, checkpoint_every=1, accumulation=2)
    b1, b2 = load_model(one).fusion.expert_bias, load_model(two).fusion.expert_bias
    assert b1.abs().min() > 0 and torch.equal(b1, b2)  # two micro-batches of 4 = one batch of 8


def test_missing_routing_stats_are_an_error():
    from mmfusion.fusion.moe import MoEFusion

    model = torch.nn.ModuleDict({"fusion": MoEFusion(["x"], 8, aux_free_bias=True)})
    hooks = StepHooks(model, data=None)
    assert hooks.active
    out = ModelOutput(torch.zeros(()), {})
    with pytest.raises(
        ConfigError, match=r"fusion: aux_free_bias is set but the model's forward returns no routing"
    ):
        hooks.after_step([(Batch({}, {}), out)])


def test_bias_update_uses_the_load_of_every_micro_batch():
    from mmfusion.fusion.moe import MoEFusion

    model = torch.nn.ModuleDict(
        {"fusion": MoEFusion(["x"], 8, num_experts=4, aux_free_bias=True, bias_update_rate=0.5)}
    )
    hooks = StepHooks(model, data=None)
    micro = [
        (
            Batch({}, {}),
            ModelOutput(torch.zeros(()), {}, routing={"fusion": torch.tensor([3.0, 0.0, 0.0, 1.0])}),
        ),
        (
            Batch({}, {}),
            ModelOutput(torch.zeros(()), {}, routing={"fusion": torch.tensor([0.0, 3.0, 1.0, 0.0])}),
        ),
    ]
    hooks.after_step(micro)
    # load [3, 3, 1, 1], mean 2: bias += 0.5 * sign(2 - load) = [-0.5, -0.5, 0.5, 0.5] (already centred)
    assert model["fusion"].expert_bias.tolist() == [-0.5, -0.5, 0.5, 0.5]


def test_a_distillation_student_reports_its_routing_under_its_name():
    from mmfusion.models.multimodal import MultiModalModel
    from mmfusion.train.distill import DistillationModel

    torch.manual_seed(0)
    student = MultiModalModel({"image": {"image_size": 16, "patch_size": 8}}, fusion="moe", dim=16,
                              fusion_kwargs={"aux_free_bias": True, "num_experts": 2, "top_k": 1})  # fmt: skip
    teacher = MultiModalModel({"image": {"image_size": 16, "patch_size": 8}}, fusion="late", dim=16)
    wrapped = DistillationModel(student, teacher)
    batch = Batch({"image": torch.rand(3, 3, 16, 16), "label": torch.tensor([0, 1, 0])}, {})
    out = wrapped(batch)
    assert list(out.routing) == ["student.fusion"]
    assert out.routing["student.fusion"].sum() == 3 * 5  # top-1 of 4 patches + 1 class token per image
    assert list(StepHooks(wrapped, data=None).balanced) == ["student.fusion"]
