"""Multi-stage runs (T3): freezing, per-stage optimizers, stage records in checkpoints, resume inside a
stage, config errors; and the CL-FT probe model (T2)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mmfusion.batch import Batch
from mmfusion.config import StageConfig, TrainConfig, config_from_dict, load_config
from mmfusion.data.loader import ListDataset, MapData
from mmfusion.errors import CheckpointError, ConfigError
from mmfusion.models.contrastive import ModelOutput
from mmfusion.train.checkpoint import list_checkpoints
from mmfusion.train.stages import (
    ContrastiveProbe,
    apply_freeze,
    fit_stages,
    probe_label,
    stage_param_groups,
)


class Toy(nn.Module):
    """encoder (3 -> 4) + head (4 -> 1), regression; dropout exercises the RNG state on resume."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.head = nn.Linear(4, 1)
        self.drop = nn.Dropout(0.2)

    def forward(self, batch: Batch) -> ModelOutput:
        pred = self.head(self.drop(self.encoder(batch["x"]))).squeeze(1)
        return ModelOutput(((pred - batch["y"]) ** 2).mean())


def collate(samples):
    x = torch.stack([s["x"] for s in samples])
    return Batch({"x": x, "y": torch.stack([s["y"] for s in samples])}, {"x": torch.ones(len(x), dtype=bool)})


SAMPLES = None


def samples():
    global SAMPLES
    if SAMPLES is None:
        g = torch.Generator().manual_seed(1)
        xs = torch.randn(64, 3, generator=g)
        ys = xs @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
        SAMPLES = [{"x": x, "y": y} for x, y in zip(xs, ys)]
    return SAMPLES


def make_data(i, stage):
    data = samples()[: stage.n_train] if stage.n_train else samples()
    return MapData(ListDataset(data), collate, stage.batch_size or 4, seed=0)


STAGES = [
    {"name": "warm", "steps": 3, "freeze": ["head.*"], "lr": 0.05},
    {
        "name": "tune",
        "steps": 5,
        "freeze": ["encoder.*"],
        "n_train": 16,
        "batch_size": 8,
        "lr": 0.02,
        "lr_groups": {"head.bias": 0.1},
        "warmup_steps": 1,
    },
]


def train_cfg(**kw):
    base = dict(
        batch_size=4,
        lr=0.05,
        warmup_steps=2,
        grad_clip=0.0,
        precision="fp32",
        device="cpu",
        checkpoint_every=2,
        keep_checkpoints=10,
        log_every=1,
        progress=False,
        deterministic=True,
        weight_decay=0.0,
        stages=STAGES,
    )
    base.update(kw)
    return TrainConfig(**base)


def run(path, resume=False, messages=None, **kw):
    model = Toy()
    log = messages.append if messages is not None else (lambda m: None)
    fit_stages(model, train_cfg(**kw), path, make_data, resume=resume, log=log)
    return model


def ckpt_weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def test_stages_freeze_and_train_in_order(tmp_path):
    messages = []
    init = Toy().state_dict()
    model = run(tmp_path / "r", messages=messages)
    end1 = ckpt_weights(tmp_path / "r", 3)  # the end of stage 1 is always checkpointed
    final = model.state_dict()
    for k in ("head.weight", "head.bias"):  # frozen in stage 1, trained in stage 2
        assert torch.equal(end1[k], init[k])
        assert not torch.equal(final[k], end1[k])
    for k in ("encoder.0.weight", "encoder.0.bias"):  # trained in stage 1, frozen in stage 2
        assert not torch.equal(end1[k], init[k])
        assert torch.equal(final[k], end1[k])
    assert all(p.requires_grad for p in model.parameters())  # the model is left fully trainable
    text = "\n".join(messages)
    assert "stage 1/2 'warm'" in text and "steps 1-3" in text and "trainable 16 of 21 parameters" in text
    assert "stage 2/2 'tune'" in text and "steps 4-8" in text and "trainable 5 of 21 parameters" in text
    assert "batch 8 from 16 samples" in text and "head.bias: 0.1" in text
    assert text.index("'warm'") < text.index("'tune'")
    # the log: global steps, the stage name and the step inside it
    logs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["stage"], x["stage_step"]) for x in logs][2:4] == [(3, "warm", 3), (4, "tune", 1)]
    assert logs[3]["lr"] == pytest.approx(0.02)  # a fresh schedule: warm-up of 1 step, then cosine


def test_checkpoints_record_the_stage(tmp_path):
    run(tmp_path / "r")
    names = [c.name for c in list_checkpoints(tmp_path / "r" / "checkpoints")]
    assert names == [f"step-{s:08d}" for s in (2, 3, 5, 7, 8)]  # every 2 in-stage steps + each stage end
    state = json.loads((tmp_path / "r" / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert state["stage"] == {"index": 1, "name": "tune", "offset": 3, "count": 2, "step": 2, "steps": 5}
    assert state["step"] == 5


@pytest.mark.parametrize("last_kept", [5, 3], ids=["inside-stage-2", "at-stage-boundary"])
def test_resume_in_stage_2_is_bitwise_identical(tmp_path, last_kept):
    full = run(tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    for ck in list_checkpoints(tmp_path / "part" / "checkpoints"):
        if int(ck.name.split("-")[1]) > last_kept:
            shutil.rmtree(ck)
    messages = []
    resumed = run(tmp_path / "part", resume=True, messages=messages)
    text = "\n".join(messages)
    if last_kept == 5:
        assert "step 5 = stage 2/2 'tune' step 2" in text
    else:
        assert "end of stage 1 'warm'" in text
    assert "stage 1/2" not in text  # stage 1 is not run again
    for (k, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), k
    a = ckpt_weights(tmp_path / "full", 8)
    b = ckpt_weights(tmp_path / "part", 8)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_run_without_stages_is_refused(tmp_path):
    from mmfusion.train.trainer import Trainer

    Trainer(
        Toy(),
        make_data(0, StageConfig(name="x", steps=1)),
        train_cfg(stages=None, steps=2),
        tmp_path,
        log=print,
    ).fit()
    with pytest.raises(CheckpointError, match="records no stage"):
        run(tmp_path, resume=True)


def test_resume_of_a_staged_run_without_stages_is_refused(tmp_path):
    from mmfusion.train.trainer import Trainer

    run(tmp_path)
    t = Trainer(
        Toy(), make_data(0, StageConfig(name="x", steps=1)), train_cfg(stages=None, steps=9), tmp_path
    )
    with pytest.raises(CheckpointError, match="written by a multi-stage run"):
        t.fit(resume=True)


def test_resume_with_renamed_stage_is_refused(tmp_path):
    run(tmp_path / "r")
    renamed = [dict(STAGES[0]), {**STAGES[1], "name": "other"}]
    with pytest.raises(CheckpointError, match="from stage 1 'tune', which this config does not have"):
        run(tmp_path / "r", resume=True, stages=renamed)


def test_param_groups_per_pattern():
    model = Toy()
    stage = StageConfig(name="s", steps=1, freeze=["encoder.*"], lr_groups={"head.bias": 0.5})
    assert apply_freeze(model, stage.freeze) == (5, 21)
    groups = stage_param_groups(model, stage, weight_decay=0.1)
    by_lr = {g.get("lr"): g for g in groups}
    assert [p.shape for p in by_lr[0.5]["params"]] == [torch.Size([1])]
    assert by_lr[0.5]["weight_decay"] == 0.0
    assert [p.shape for p in by_lr[None]["params"]] == [torch.Size([1, 4])]
    assert by_lr[None]["weight_decay"] == 0.1


@pytest.mark.parametrize(
    "stages, expected",
    [
        (
            [{"name": "a", "steps": 1, "freeze": ["encoders.*"]}],
            "train.stages.0.freeze: pattern 'encoders.*' (stage 'a') matches no parameter; "
            "top-level names: encoder.*, head.*",
        ),
        (
            [
                {"name": "a", "steps": 1},
                {"name": "b", "steps": 1, "freeze": ["head.*"], "lr_groups": {"head.*": 1.0}},
            ],
            "train.stages.1.lr_groups: pattern 'head.*' (stage 'b') matches no trainable parameter",
        ),
        (
            [{"name": "a", "steps": 1, "freeze": ["*"]}],
            "train.stages.0.freeze (stage 'a') freezes every parameter",
        ),
    ],
)
def test_patterns_that_match_nothing_are_errors_before_training(tmp_path, stages, expected):
    with pytest.raises(ConfigError) as e:
        run(tmp_path / "r", stages=stages)
    assert expected in str(e.value)
    assert not (tmp_path / "r").exists()  # nothing was trained


@pytest.mark.parametrize(
    "tree, expected",
    [
        (
            {"train": {"stages": [{"name": "a", "steps": 1, "frozen": ["x"]}]}},
            "unknown key 'train.stages.0.frozen'; allowed keys here: batch_size, data, eval_every, freeze,",
        ),
        ({"train": {"stages": [{"name": "a"}]}}, "train.stages.0.steps"),
        (
            {"train": {"steps": 5, "stages": [{"name": "a", "steps": 3}]}},
            "train: steps = 5 but the stages add up to 3",
        ),
        (
            {"train": {"stages": [{"name": "a", "steps": 1}, {"name": "a", "steps": 1}]}},
            "duplicate stage name 'a'",
        ),
        ({"train": {"stages": []}}, "stages is empty"),
        (
            {"train": {"stages": [{"name": "a", "steps": 1, "objective": "probe"}]}},
            "train.stages.0.objective = 'probe' needs model.probe",
        ),
        (
            {"train": {"stages": [{"name": "a", "steps": 1, "lr_groups": {"head.*": 0}}]}},
            "train.stages.0: lr_groups['head.*'] = 0.0: a learning rate must be in (0, 10]",
        ),
        (
            {"train": {"stages": [{"name": "a", "steps": 1, "precision": "fp8"}]}},
            "train.stages.0.precision = 'fp8'",
        ),
        ({"model": {"probe": {"label": "shape"}}}, "model.probe is set but no stage"),
        (
            {
                "task": {"name": "vqa"},
                "train": {"stages": [{"name": "a", "steps": 1, "objective": "contrastive"}]},
            },
            "train.stages.0.objective = 'contrastive': a fusion model trains its own loss",
        ),
        ({"model": {"probe": {"label": "hue"}}}, "model.probe.label = 'hue'"),
    ],
)
def test_stage_config_errors_name_the_key(tree, expected):
    with pytest.raises(ConfigError) as e:
        config_from_dict(tree)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_stages_sum_steps_and_set_overrides_reach_list_items(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  stages:\n    - {name: a, steps: 3}\n    - {name: b, steps: 4, lr: 0.1}\n")
    cfg = load_config(p, ["train.stages.1.steps=6", "train.stages.0.freeze=['x.*']"])
    assert cfg.train.steps == 9 and cfg.train.stages[1].steps == 6 and cfg.train.stages[0].freeze == ["x.*"]
    assert cfg.train.stages[1].train_overrides() == {"steps": 6, "lr": 0.1}
    with pytest.raises(ConfigError, match="'2' is not an index of train.stages"):
        load_config(p, ["train.stages.2.steps=1"])
    from mmfusion.config import dump_config

    dump_config(cfg, tmp_path / "snap.yaml")  # the snapshot (with the summed steps) loads again
    assert load_config(tmp_path / "snap.yaml") == cfg
    assert load_config(None).train.stages is None  # no stages: unchanged defaults


def test_probe_label_reads_the_leftmost_object():
    scene = {
        "objects": [
            {"shape": "cross", "colour": "red", "size": "small", "x": 0.8, "y": 0.5},
            {"shape": "circle", "colour": "blue", "size": "large", "x": 0.2, "y": 0.5},
        ]
    }
    assert probe_label(scene, "shape") == 0  # circle
    assert probe_label(scene, "colour") == 2  # blue
    assert probe_label(scene, "size") == 1  # large
    assert probe_label(scene, "count") == 1  # two objects


def test_probe_model_objectives_and_save_load(tmp_path, make_tiny_model):
    from mmfusion.models.contrastive import ContrastiveModel

    tiny = make_tiny_model()
    cfg = type(tiny.config).model_validate(
        {**tiny.config.model_dump(), "probe": {"label": "colour", "hidden": 8}}
    )
    torch.manual_seed(0)
    model = ContrastiveProbe(cfg, tiny.tokenizer)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    batch = Batch(
        {
            "image": images,
            "text": tiny.tokenizer.encode(["a red circle"] * 4),
            "label": torch.tensor([0, 1, 2, 3]),
        },
        {},
    )
    contrastive = model(batch)
    assert "batch_i2t_acc" in contrastive.metrics
    model.objective = "probe"
    out = model(batch)
    assert "probe_acc" in out.metrics and out.loss.ndim == 0
    out.loss.backward()
    assert model.head[0].weight.grad is not None
    model.save_pretrained(tmp_path / "m")
    assert set(load_file(str(tmp_path / "m" / "probe.safetensors"))) == {
        "head.0.weight",
        "head.0.bias",
        "head.2.weight",
        "head.2.bias",
    }
    assert "head.0.weight" not in load_file(str(tmp_path / "m" / "model.safetensors"))
    backbone = ContrastiveModel.from_pretrained(tmp_path / "m")  # an ordinary contrastive folder
    loaded = ContrastiveProbe.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.predict(images), model.predict(images))
    torch.testing.assert_close(backbone.encode_image(images), model.encode_image(images))


def test_task_run_with_stages_freezes_encoders_by_pattern(tmp_path):
    """The generic path: a fusion model on a synthetic task, stage 2 trains only the fusion + head."""
    from mmfusion.run import train

    cfg = config_from_dict(
        {
            "name": "staged",
            "out_dir": str(tmp_path),
            "task": {"name": "vqa", "n_train": 32, "n_val": 4, "n_test": 4},
            "fusion_model": {"encoders": {"image": "tiny", "text": "tiny"}},
            "train": {
                "batch_size": 8,
                "precision": "fp32",
                "device": "cpu",
                "progress": False,
                "checkpoint_every": 100,
                "stages": [
                    {"name": "all", "steps": 2},
                    {"name": "top", "steps": 2, "freeze": ["encoders.*"], "n_train": 16, "lr": 0.01},
                ],
            },
        }
    )
    messages = []
    train(cfg, log=messages.append)
    run = tmp_path / "staged"
    end1, end2 = ckpt_weights(run, 2), ckpt_weights(run, 4)
    enc = [k for k in end1 if k.startswith("encoders.")]
    rest = [k for k in end1 if not k.startswith("encoders.")]
    assert enc and rest
    assert all(torch.equal(end1[k], end2[k]) for k in enc)
    assert any(not torch.equal(end1[k], end2[k]) for k in rest)
    assert any(
        "stage 2/2 'top' (objective the model's loss)" in m and "frozen: encoders.*" in m for m in messages
    )
