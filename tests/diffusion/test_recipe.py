"""A diffusion run through the Trainer: resume equals an uninterrupted run, the model folder round-trips to
bit-identical samples, the YAML recipe validates, `mmfusion generate` works, and a tiny run learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusion_tiny import randomised, tiny_config

from mmfusion.config import load_config
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig
from mmfusion.diffusion.model import JointDiffusion
from mmfusion.diffusion.recipe import fit_diffusion, load_diffusion, save_diffusion
from mmfusion.diffusion.sampling import sample
from mmfusion.errors import CheckpointError, ConfigError
from mmfusion.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _train(steps: int, **kw) -> TrainConfig:
    base = dict(steps=steps, batch_size=8, lr=2e-3, warmup_steps=2, device="cpu", progress=False, log_every=1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def world8():
    return SyntheticWorld(WorldConfig(seed=0, image_size=8, object_count_probs=(1.0, 0.0, 0.0)))


def test_resume_equals_an_uninterrupted_run(world8, tmp_path):
    cfg = tiny_config()
    quiet = lambda _m: None  # noqa: E731
    whole, _ = fit_diffusion(cfg, _train(4), world8, 32, tmp_path / "a", log=quiet)
    fit_diffusion(cfg, _train(4, checkpoint_every=2).model_copy(update={"steps": 2}), world8, 32, tmp_path / "b", log=quiet)
    resumed, _ = fit_diffusion(cfg, _train(4, checkpoint_every=2), world8, 32, tmp_path / "b", resume=True, log=quiet)
    a, b = whole.state_dict(), resumed.state_dict()
    assert int(a["ema_updates"]) == 4 and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_model_folder_round_trip_gives_identical_samples(tiny_model, tmp_path):
    save_diffusion(tiny_model, tmp_path / "model")
    loaded = load_diffusion(tmp_path)  # a run directory holding model/
    text = torch.randn(2, 8, 8)
    a = sample(tiny_model, "image", text=text, steps=3, guidance=2.0, seed=7)
    b = sample(loaded, "image", text=text, steps=3, guidance=2.0, seed=7)
    assert torch.equal(a.image, b.image)
    j1, j2 = sample(tiny_model, "joint", n=2, steps=2), sample(loaded, "joint", n=2, steps=2)
    assert torch.equal(j1.text, j2.text)
    with pytest.raises(CheckpointError, match="not a joint diffusion model folder"):
        load_diffusion(tmp_path / "nothing")


def test_yaml_recipe_validates():
    cfg = load_config(ROOT / "configs" / "diffusion.yaml")
    assert cfg.kind == "diffusion" and cfg.model.image_size == 32
    with pytest.raises(ConfigError, match="unknown key 'model.depthh'"):
        load_config(ROOT / "configs" / "diffusion.yaml", ["model.depthh=3"])
    with pytest.raises(ConfigError, match="not divisible by patch"):
        load_config(ROOT / "configs" / "diffusion.yaml", ["model.patch=5"])


def test_generate_cli_on_a_diffusion_folder(tmp_path, capsys):
    from mmfusion.cli import main

    torch.manual_seed(0)
    model = randomised(JointDiffusion(tiny_config(text_len=8)))
    save_diffusion(model, tmp_path / "run" / "model")
    run = str(tmp_path / "run")
    assert main(["generate", "--model", run, "--task", "joint", "--n", "3", "--out-dir", str(tmp_path / "j"), "--ddim-steps", "2"]) == 0
    assert len(list((tmp_path / "j").glob("*.png"))) == 3
    out = tmp_path / "i"
    assert main(["generate", "--model", run, "--task", "image", "--prompt", "a red circle", "--out-dir", str(out)]) == 0
    png = next(out.glob("*.png"))
    capsys.readouterr()
    assert main(["generate", "--model", run, "--task", "caption", "--image", str(png)]) == 0
    assert str(png) in capsys.readouterr().out
    capsys.readouterr()
    assert main(["generate", "--model", run, "--task", "image", "--prompt", "a red dog", "--out-dir", str(out)]) == 1
    assert "words ['dog'] are not in the world's caption vocabulary" in capsys.readouterr().err


def test_tiny_run_learns_captions(tmp_path):
    """150 steps on 16 px one-object scenes: the image -> text task reads the colour far above chance (1/8)."""
    from mmfusion.diffusion.evaluate import caption_matches  # noqa: F401 - the module imports cleanly
    from mmfusion.diffusion.recipe import text_codec, world_data
    from mmfusion.unified.train import parse_caption

    world = SyntheticWorld(WorldConfig(seed=0, image_size=16, object_count_probs=(1.0, 0.0, 0.0)))
    cfg = tiny_config(image_size=16, patch=4, width=64, depth=2, heads=4, timesteps=100, cond_prob=0.6)
    model, last = fit_diffusion(cfg, _train(150, batch_size=32, lr=3e-3, warmup_steps=10, log_every=50),
                                world, 512, tmp_path, log=lambda _m: None)
    assert last["loss"] < 0.8  # from ~2 at the zero-initialised start
    images, scenes = world_data(world, 64, "test")
    caps = text_codec(cfg).decode(sample(model, "caption", image=images, steps=10, seed=0).text)
    colour = [parse_caption(c) is not None and parse_caption(c)[0][1] == s.objects[0].colour for c, s in zip(caps, scenes)]
    assert sum(colour) / len(colour) > 0.5
