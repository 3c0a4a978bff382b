"""`mmfusion train` with configs/vlm_caption.yaml (a tiny random local Llama as model.lm.hf), then `mmfusion generate
--task caption` with the run's model folder, as real subprocesses with hard timeouts; a missing LM folder is a
one-line config error (exit 2), through `mmfusion.cli.main` in-process."""

from pathlib import Path

from PIL import Image

from mmfusion.data.synthetic import SyntheticWorld, WorldConfig
from tiny_lm import tiny_lm_folder

RECIPE = Path(__file__).parents[2] / "configs" / "vlm_caption.yaml"
TINY = [
    "data.synthetic.n_train=64", "data.synthetic.n_val=8", "data.synthetic.n_test=8", "train.steps=4",
    "train.batch_size=8", "train.checkpoint_every=2", "train.log_every=1", "train.device=cpu", "train.threads=1",
    "train.precision=fp32", "train.progress=false", "train.warmup_steps=1",
]  # fmt: skip


def test_train_then_generate_captions(tmp_path, mmfusion):
    lm = tiny_lm_folder(tmp_path / "tiny_llama", "llama")
    sets = [a for s in [*TINY, f"model.lm.hf={lm}", "out_dir=runs"] for a in ("--set", s)]
    proc = mmfusion("train", "--config", RECIPE, *sets, cwd=tmp_path, timeout=300)
    assert "LlamaForCausalLM" in proc.stdout and "merged into the saved model" in proc.stdout
    assert "colour_accuracy" in proc.stdout  # mmfusion train evaluates the run (caption metrics)
    run = tmp_path / "runs" / "vlm_caption"
    assert (run / "model" / "lm" / "model.safetensors").is_file() and (run / "adapters").is_dir()
    world = SyntheticWorld(WorldConfig(seed=0, image_size=16))
    for i in range(2):
        Image.fromarray(world.sample("test", i)["image"]).save(tmp_path / f"im{i}.png")
    out = mmfusion(
        "generate", "--model", run / "model", "--task", "caption", "--image", "im0.png", "im1.png",
        "--max-new-tokens", "6", "--json", "caps.json", cwd=tmp_path, timeout=180,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["im0.png", "im1.png"]
    assert all(len(line.split("\t")[1].split()) >= 1 for line in lines)
    assert (tmp_path / "caps.json").is_file()


def test_missing_lm_folder_is_a_one_line_config_error(tmp_path, capsys):
    from mmfusion.cli import main

    code = main(
        ["train", "--config", str(RECIPE), "--set", f"out_dir={tmp_path}", "--set", "model.lm.hf=nowhere"]
    )
    err = capsys.readouterr().err
    assert (
        code == 2 and "model.lm.hf = 'nowhere': no such folder" in err and len(err.strip().splitlines()) == 1
    )
