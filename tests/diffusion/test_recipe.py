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
    fit_diffusion(
        cfg,
        _train(4, checkpoint_every=2).model_copy(update={"steps": 2}),
        world8,
        32,
        tmp_path / "b",
        log=quiet,
    )
    resumed, _ = fit_diffusion(
        cfg, _train(4, checkpoint_every=2), world8, 32, tmp_path / "b", resume=True, log=quiet
    )
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


def test_autoencoder_latent_trains_first_stays_frozen_and_round_trips(world8, tmp_path):
    cfg = tiny_config(image_latent="autoencoder", ae_latent_dim=8, ae_tokens=2, ae_channels=4, ae_steps=5)
    assert (cfg.image_tokens, cfg.image_token_dim) == (2, 4)
    model, _ = fit_diffusion(cfg, _train(3), world8, 16, tmp_path / "run", log=lambda _m: None)
    codec = {k: v.clone() for k, v in model.image_codec.state_dict().items()}
    assert codec["std"].ne(1).all()  # fitted before the denoiser
    longer, _ = fit_diffusion(cfg, _train(6), world8, 16, tmp_path / "run2", log=lambda _m: None)
    loaded = load_diffusion(tmp_path / "run")
    for k, v in codec.items():  # the Trainer leaves it alone; the model folder carries it
        torch.testing.assert_close(longer.image_codec.state_dict()[k], v, atol=0, rtol=0, msg=k)
        torch.testing.assert_close(loaded.image_codec.state_dict()[k], v, atol=0, rtol=0, msg=k)
    assert not torch.equal(longer.net.image_out.weight, model.net.image_out.weight)
    text = torch.randn(2, 8, 8)
    a = sample(model, "image", text=text, steps=3, guidance=2.0, seed=7)
    assert a.image.shape == (2, 3, 8, 8) and a.image.abs().max() <= 1
    assert torch.equal(a.image, sample(loaded, "image", text=text, steps=3, guidance=2.0, seed=7).image)
    cap = sample(loaded, "caption", image=a.image, steps=2)
    assert cap.text.shape == (2, 8, 8)


def test_yaml_recipe_validates():
    cfg = load_config(ROOT / "configs" / "diffusion.yaml")
    assert cfg.kind == "diffusion" and cfg.model.image_size == 32
    with pytest.raises(ConfigError, match="unknown key 'model.depthh'"):
        load_config(ROOT / "configs" / "diffusion.yaml", ["model.depthh=3"])
    with pytest.raises(ConfigError, match="ae_latent_dim = 30 is not divisible by ae_tokens = 4"):
        load_config(
            ROOT / "configs" / "diffusion.yaml", ["model.image_latent=autoencoder", "model.ae_latent_dim=30"]
        )


def test_unsupported_train_settings_are_refused_by_name(world8, tmp_path):
    for setting, message in [
        ({"init_from": "runs/x"}, "train.init_from: not supported for a diffusion model"),
        (
            {"parallel": {"tensor": {"size": 2}}},
            "train.parallel.tensor.size: not supported for a diffusion model",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            fit_diffusion(
                tiny_config(), _train(1, **setting), world8, 8, tmp_path / "run", log=lambda _m: None
            )
    assert not (tmp_path / "run").exists()


def test_generate_cli_on_a_diffusion_folder(tmp_path, capsys):
    from mmfusion.cli import main

    torch.manual_seed(0)
    model = randomised(JointDiffusion(tiny_config(text_len=8)))
    save_diffusion(model, tmp_path / "run" / "model")
    run = str(tmp_path / "run")
    assert (
        main(
            [
                "generate",
                "--model",
                run,
                "--task",
                "joint",
                "--n",
                "3",
                "--out-dir",
                str(tmp_path / "j"),
                "--ddim-steps",
                "2",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "j").glob("*.png"))) == 3
    out = tmp_path / "i"
    assert (
        main(
            ["generate", "--model", run, "--task", "image", "--prompt", "a red circle", "--out-dir", str(out)]
        )
        == 0
    )
    png = next(out.glob("*.png"))
    capsys.readouterr()
    assert main(["generate", "--model", run, "--task", "caption", "--image", str(png)]) == 0
    assert str(png) in capsys.readouterr().out
    capsys.readouterr()
    assert (
        main(["generate", "--model", run, "--task", "image", "--prompt", "a red dog", "--out-dir", str(out)])
        == 1
    )
    assert "words ['dog'] are not in the world's caption vocabulary" in capsys.readouterr().err


def test_tiny_run_learns(tmp_path):
    """100 steps on 8 px one-object scenes: both denoising losses fall well below their zero-prediction
    values (image eps MSE 1, text latent MSE 1), logged by the Trainer in metrics.jsonl."""
    import json

    world = SyntheticWorld(WorldConfig(seed=0, image_size=8, object_count_probs=(1.0, 0.0, 0.0)))
    cfg = tiny_config(text_len=4, width=32, depth=2, heads=4, timesteps=100)
    train = _train(100, batch_size=32, lr=3e-3, warmup_steps=10, log_every=10)
    fit_diffusion(cfg, train, world, 256, tmp_path, log=lambda _m: None)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert last["step"] == 100 and (tmp_path / "model" / "model.safetensors").is_file()
    assert first["mse_text"] > 0.6 and last["mse_text"] < 0.45
    assert last["mse_image"] < 0.8


def test_mmfusion_train_runs_the_recipe(tmp_path):
    """`mmfusion train --config configs/diffusion.yaml` (the run path): config.yaml, checkpoints, model/."""
    from mmfusion.run import train

    sets = [f"out_dir={tmp_path}", "train.steps=2", "train.batch_size=4", "train.progress=false"]
    sets += ["data.synthetic.n_train=8", "model.image_size=8", "model.width=16", "model.depth=1"]
    cfg = load_config(ROOT / "configs" / "diffusion.yaml", sets)
    out = train(cfg, log=lambda _m: None)
    run = Path(out["run_dir"])
    assert (run / "config.yaml").is_file() and any((run / "checkpoints").iterdir())
    assert load_diffusion(run).cfg.image_size == 8
    with pytest.raises(ConfigError, match="already has checkpoints"):
        train(cfg, log=lambda _m: None)
    bad = load_config(ROOT / "configs" / "diffusion.yaml", [*sets, "data.source=jsonl", "data.train=x.jsonl"])
    with pytest.raises(ConfigError, match="a diffusion model trains on the synthetic world"):
        train(bad, log=lambda _m: None)
