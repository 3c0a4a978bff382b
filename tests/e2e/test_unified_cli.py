"""`mmfusion tokenize train|encode|decode`, `mmfusion train-unified` and `mmfusion generate` end to end (tiny).

The two training commands and one generation run as real `mmfusion` subprocesses; the other commands go
through `mmfusion.cli.main` in-process (same parser and error handling, without a torch import per call).
"""

import json

import numpy as np
import pytest
from PIL import Image

from mmfusion.cli import main
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("unified_cli")
    world = SyntheticWorld(WorldConfig(seed=0, image_size=16))
    (d / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(world.sample("test", i)["image"]).save(d / "imgs" / f"im{i}.png")
    return d


@pytest.fixture(scope="module")
def tokenizer(workdir, mmfusion):
    proc = mmfusion(
        "tokenize", "train", "--out", "tok", "--steps", "20", "--train-images", "64", "--eval-images", "16",
        "--image-size", "16", "--codebook-size", "32", "--channels", "16", "--code-dim", "8", "--threads", "1",
        cwd=workdir,
    )  # fmt: skip
    assert "held-out: usage" in proc.stdout and "16 tokens/image" in proc.stdout
    return workdir / "tok"


@pytest.fixture(scope="module")
def model(workdir, tokenizer, mmfusion):
    proc = mmfusion(
        "train-unified", "--out", "model", "--tokenizer", "tok", "--image-size", "16", "--samples", "64",
        "--steps", "12", "--warmup", "2", "--dim", "32", "--depth", "1", "--heads", "2", "--text-vocab", "96",
        "--threads", "1", cwd=workdir,
    )  # fmt: skip
    assert "trained 12 steps" in proc.stdout
    return workdir / "model"


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.timeout(120)
def test_tokenize_encode_decode(workdir, tokenizer, capsys):
    metrics = json.loads((tokenizer / "metrics.json").read_text())
    assert metrics["codebook_size"] == 32 and 0 < metrics["usage"] <= 1
    w = workdir
    assert (
        _run(capsys, "tokenize", "encode", "--tokenizer", tokenizer, w / "imgs", "--out", w / "codes.json")[0]
        == 0
    )
    assert (
        _run(
            capsys, "tokenize", "encode", "--tokenizer", tokenizer, w / "imgs/im0.png", "--out", w / "c.npy"
        )[0]
        == 0
    )
    doc = json.loads((w / "codes.json").read_text())
    assert doc["shape"] == [4, 4] and [r["id"] for r in doc["images"]] == ["im0", "im1", "im2"]
    npy = np.load(w / "c.npy")
    assert npy.shape == (1, 4, 4) and npy.tolist()[0] == doc["images"][0]["codes"]
    code, out, _ = _run(
        capsys, "tokenize", "decode", "--tokenizer", tokenizer, w / "codes.json", "--out-dir", w / "dec"
    )
    assert code == 0 and "decoded 3 images" in out
    assert sorted(p.name for p in (w / "dec").iterdir()) == ["im0.png", "im1.png", "im2.png"]
    assert Image.open(w / "dec" / "im0.png").size == (16, 16)


@pytest.mark.timeout(60)
def test_tokenize_errors_are_one_line(workdir, tokenizer, capsys):
    w = workdir
    code, _, err = _run(
        capsys, "tokenize", "decode", "--tokenizer", tokenizer, w / "imgs/im0.png", "--out-dir", w / "x"
    )
    assert code != 0 and "expected a .json or .npy codes file" in err and len(err.strip().splitlines()) == 1
    np.save(w / "bad.npy", np.full((1, 4, 4), 99, dtype=np.int32))
    code, _, err = _run(
        capsys, "tokenize", "decode", "--tokenizer", tokenizer, w / "bad.npy", "--out-dir", w / "x"
    )
    assert code != 0 and "codes must lie in [0, 32); got [99, 99]" in err
    code, _, err = _run(
        capsys, "tokenize", "encode", "--tokenizer", w / "imgs", w / "imgs", "--out", w / "c.json"
    )
    assert code != 0 and "not a tokenizer folder" in err


@pytest.mark.timeout(180)
def test_generate_caption_image_and_vqa(workdir, model, mmfusion, capsys):
    for part in (
        "decoder/model.safetensors",
        "image_tokenizer/model.safetensors",
        "text/tokenizer.json",
        "vocab.json",
    ):
        assert (model / part).is_file()
    info = json.loads((model / "train.json").read_text())
    assert info["train"]["steps"] == 12 and set(info["tasks"]) == {"caption", "image", "vqa"}
    mmfusion("generate", "--model", "model", "--task", "image", "--prompt", "a red circle", "--n", "2",
             "--cfg-scale", "2", "--out-dir", "gen", cwd=workdir)  # fmt: skip
    files = sorted(p.name for p in (workdir / "gen").iterdir())
    assert files == ["000_00_a_red_circle.png", "000_01_a_red_circle.png"]
    assert Image.open(workdir / "gen" / files[0]).size == (16, 16)

    w = workdir
    code, out, _ = _run(capsys, "generate", "--model", model, "--task", "caption", "--image", w / "imgs/im0.png",
                        w / "imgs/im1.png", "--json", w / "cap.json")  # fmt: skip
    caps = json.loads((w / "cap.json").read_text())
    assert code == 0 and [c["image"].endswith(f"im{i}.png") for i, c in enumerate(caps)] == [True, True]
    assert len(out.strip("\n").splitlines()) == 2
    code, out, _ = _run(capsys, "generate", "--model", model, "--task", "vqa", "--image", w / "imgs/im0.png",
                        "--question", "how many objects are there?", "--json", w / "vqa.json")  # fmt: skip
    assert (
        code == 0 and json.loads((w / "vqa.json").read_text())[0]["question"] == "how many objects are there?"
    )


@pytest.mark.timeout(60)
def test_generate_errors_are_one_line(workdir, model, capsys):
    w = workdir
    code, _, err = _run(
        capsys, "generate", "--model", w / "imgs", "--task", "caption", "--image", w / "imgs/im0.png"
    )
    assert code != 0 and "is not a unified model folder" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "generate", "--model", model, "--task", "image", "--prompt", "a red circle")
    assert code != 0 and "--task image needs --prompt TEXT and --out-dir DIR" in err
    code, _, err = _run(capsys, "generate", "--model", model, "--task", "vqa", "--image", w / "imgs/im0.png",
                        w / "imgs/im1.png", "--question", "a?", "--question", "b?", "--question", "c?")  # fmt: skip
    assert code != 0 and "3 --question for 2 images" in err
