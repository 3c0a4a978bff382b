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
            "unknown key 'nope'; allowed keys here: data, eval, fusion_model, model, name, out_dir, seed, task, train",
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

    recipes = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert recipes, "configs/ has no recipes"
    for path in recipes:
        load_config(path)
