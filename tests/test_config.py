import pytest

from mmfusion.config import RunConfig, dump_config, load_config, parse_overrides
from mmfusion.errors import ConfigError


def test_defaults_validate_and_overrides_are_typed():
    cfg = load_config(None, ["train.lr=3e-4", "train.steps=7", "model.loss=dual", "train.betas=[0.9, 0.95]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 7
    assert cfg.model.loss == "dual"
    assert cfg.train.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=abc", "train.lr = 'abc': Input should be a valid number"),
        ("train.foo=1", "unknown key 'train.foo'; allowed keys here: accumulation"),
        (
            "nope=1",
            "unknown key 'nope'; allowed keys here: data, eval, federated, model, name, out_dir, seed, train",
        ),
        ("train.precision=fp8", "train.precision = 'fp8': Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ("train.steps=0", "train.steps = 0: Input should be greater than or equal to 1"),
        ("model.image.patch_size=5", "model.image: image_size 32 must be divisible by patch_size 5"),
        ("data.source=jsonl", "data: data.source=jsonl needs data.train"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 5\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'train.warmup'"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_overrides(["train.steps"])


def test_snapshot_round_trip(tmp_path):
    cfg = load_config(None, ["name=x", "train.steps=3"])
    dump_config(cfg, tmp_path / "s.yaml")
    assert load_config(tmp_path / "s.yaml") == cfg
    assert isinstance(cfg, RunConfig)


def test_shipped_recipes_validate():
    from pathlib import Path

    from mmfusion.align.pipeline import load_align_config

    recipes = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert recipes, "configs/ has no recipes"
    align_recipes = {"ppo_cs.yaml"}  # `mmfusion align` configs (mmfusion.align.pipeline.AlignConfig)
    for path in recipes:
        load_align_config(path) if path.name in align_recipes else load_config(path)


TASK = ["task.name=vqa"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["train.grad_checkpointing=maybe"],
            "train.grad_checkpointing = 'maybe': Input should be a valid boolean",
        ),
        (["train.lora.r=0"], "train.lora.r = 0: Input should be greater than or equal to 1"),
        (
            ["train.lora.rank=4"],
            "unknown key 'train.lora.rank'; allowed keys here: alpha, dropout, r, targets, trainable",
        ),
        (["train.lora.targets=[]"], "train.lora.targets = []: List should have at least 1 item"),
        (
            ["train.lora.r=4", "train.stages=[{name: a, steps: 2}]"],
            "train.lora with train.stages: stages set which parameters train",
        ),
        (
            ["train.lora.r=4", "train.parallel.fsdp.enabled=true"],
            "train.lora with parallel.fsdp / parallel.tensor is not supported yet",
        ),
        (
            ["train.init_from=runs/a", "model.text.tokenizer=t.json"],
            "train.init_from and model.text.tokenizer are both set",
        ),
        (["data.sampler=weighted"], "data.sampler = 'weighted': Input should be 'shuffle' or 'ddwa'"),
        (
            ["data.sampler=ddwa"],
            "data.sampler = 'ddwa': it weights each training sample by its classification gradient",
        ),
        ([*TASK, "data.sampler=ddwa", "data.num_workers=2"], "data.num_workers: 0"),
        (
            [*TASK, "data.sampler=ddwa", "train.distill.teacher=t"],
            "data.sampler = 'ddwa': train.distill is not supported",
        ),
        (["data.ddwa.boost=2"], "data: ddwa is set but sampler = 'shuffle'; use sampler: ddwa"),
        (["data.ddwa.top_fraction=2"], "data.ddwa.top_fraction = 2: Input should be less than or equal to 1"),
        (
            ["train.parallel.pipeline.size=2"],
            "parallel.pipeline.size > 1: the Trainer does not drive pipeline schedules; pipeline parallel is the "
            "library API mmfusion.train.parallel.build_pipeline (docs/distributed.md)",
        ),
        (
            [*TASK, "fusion_model.fusion=router", "fusion_model.fusion_kwargs.aux_free_bias=true"],
            "model: fusion_kwargs: ['aux_free_bias'] are not arguments of the router fusion; allowed: "
            "hidden, prune_threshold",
        ),
    ],
)
def test_training_settings_are_validated(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_training_settings_validate_for_both_recipes():
    lora = "train.lora={r: 4, alpha: 8, targets: [attn.qkv], trainable: ['head.*']}"
    two_tower = load_config(None, ["train.grad_checkpointing=true", lora, "train.init_from=runs/a"])
    assert two_tower.train.lora.targets == ["attn.qkv"] and two_tower.train.grad_checkpointing
    fusion = load_config(
        None,
        [
            *TASK,
            lora,
            "data.sampler=ddwa",
            "data.ddwa.warmup=5",
            "fusion_model.fusion=moe",
            "fusion_model.fusion_kwargs.aux_free_bias=true",
        ],
    )
    assert fusion.data.ddwa.warmup == 5 and fusion.model.fusion_kwargs == {"aux_free_bias": True}


def test_cli_answers_a_bad_setting_with_one_line_and_exit_2(capsys, tmp_path):
    from mmfusion.cli import main

    assert main(["train", "--set", f"out_dir={tmp_path}", "--set", "train.lora.alpha=0"]) == 2
    err = capsys.readouterr().err
    assert err == "mmfusion: config error: defaults: train.lora.alpha = 0: Input should be greater than 0\n"
