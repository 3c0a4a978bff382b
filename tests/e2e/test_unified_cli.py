"""`mmfusion tokenize train|encode|decode`, `mmfusion train-unified` and `mmfusion generate` end to end (tiny).

The two training commands and one generation run as real `mmfusion` subprocesses; the other commands go
through `mmfusion.cli.main` in-process (same parser and error handling, without a torch import per call).
`train-unified --out DIR` writes a run directory (the common Trainer's: checkpoints/, metrics.jsonl,
config.yaml) whose model folder is DIR/model; `generate --model` takes either.
"""

import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from mmfusion.cli import main
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig
from mmfusion.safety.provenance import KEY_ENV, folder_id


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
        "--threads", "1", "--modality-gate", "--image-window", "8", cwd=workdir,
    )  # fmt: skip
    assert "trained 12 steps" in proc.stdout
    cfg = json.loads((workdir / "model" / "model" / "decoder" / "config.json").read_text())["model"]
    assert cfg["modality_gate"] is True and cfg["image_window"] == 8 and cfg["hierarchical_layers"] == 0
    assert sorted(p.name for p in (workdir / "model" / "checkpoints").iterdir()) == [
        "step-00000009",
        "step-00000012",
    ]
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
        "config.json",
    ):
        assert (model / "model" / part).is_file()
    assert yaml.safe_load((model / "config.yaml").read_text())["model"]["kind"] == "unified"
    info = json.loads((model / "model" / "train.json").read_text())
    assert info["train"]["steps"] == 12 and set(info["tasks"]) == {"caption", "image", "vqa"}
    mmfusion("generate", "--model", "model", "--task", "image", "--prompt", "a red circle", "--n", "2",
             "--cfg-scale", "2", "--out-dir", "gen", cwd=workdir)  # fmt: skip
    files = sorted(p.name for p in (workdir / "gen").iterdir())
    assert files == ["000_00_a_red_circle.png", "000_01_a_red_circle.png"]
    assert Image.open(workdir / "gen" / files[0]).size == (16, 16)
    # the same seed with a signed manifest and the watermark: pixels within +-3, manifest verifies
    os.environ[KEY_ENV] = "e2e-key"
    try:
        code, _, _ = _run(capsys, "generate", "--model", model, "--task", "image", "--prompt", "a red circle",
                          "--n", "2", "--cfg-scale", "2", "--out-dir", workdir / "signed", "--provenance",
                          "--watermark")  # fmt: skip
        assert code == 0
        signed = workdir / "signed" / files[0]
        plain = np.asarray(Image.open(workdir / "gen" / files[0]), dtype=int)
        diff = np.abs(np.asarray(Image.open(signed), dtype=int) - plain)
        assert 0 < diff.max() <= 3
        manifest = json.loads(signed.with_name(signed.name + ".provenance.json").read_text())
        assert (
            manifest["prompt"] == "a red circle" and manifest["seed"] == 0 and manifest["watermark"] is True
        )
        assert manifest["model_id"] == folder_id(model / "model")
        assert _run(capsys, "provenance", "verify", signed)[0] == 0
    finally:
        del os.environ[KEY_ENV]

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


@pytest.fixture(scope="module")
def audio_tokenizer(workdir):
    """A tiny audio tokenizer trained in-process, and two WAV files (one stereo at 44.1 kHz)."""
    import soundfile as sf

    world = SyntheticWorld(WorldConfig(seed=0))
    (workdir / "wavs").mkdir()
    clip = world.sample("test", 0, ("audio",))["audio"]
    sf.write(workdir / "wavs" / "a0.wav", clip, 16000)
    stereo = np.stack([clip, clip], axis=1)[np.arange(22050) * 16000 // 44100]
    sf.write(workdir / "wavs" / "a1.wav", stereo, 44100)
    code = main(
        ["tokenize", "train", "--modality", "audio", "--out", str(workdir / "atok"), "--steps", "3",
         "--train-images", "8", "--eval-images", "4", "--channels", "4", "--codebook-size", "8",
         "--code-dim", "4", "--threads", "1"]
    )  # fmt: skip
    assert code == 0
    return workdir / "atok"


@pytest.mark.timeout(60)
def test_tokenize_audio_train_encode_decode(workdir, audio_tokenizer, capsys):
    w, tok = workdir, audio_tokenizer
    capsys.readouterr()
    meta = json.loads((tok / "frontend.json").read_text())
    assert meta == {"modality": "audio", "sample_rate": 16000, "seconds": 0.5, "n_mels": 64, "hop": 160}
    metrics = json.loads((tok / "metrics.json").read_text())
    assert metrics["tokens_per_image"] == 16 * 13 and metrics["codebook_size"] == 8
    code, out, _ = _run(capsys, "tokenize", "encode", "--tokenizer", tok, w / "wavs", "--out", w / "ac.json")
    assert code == 0 and "encoded 2 clips to (16, 13) codes each" in out
    doc = json.loads((w / "ac.json").read_text())
    assert doc["shape"] == [16, 13] and [r["id"] for r in doc["images"]] == ["a0", "a1"]
    code, out, _ = _run(
        capsys, "tokenize", "decode", "--tokenizer", tok, w / "ac.json", "--out-dir", w / "adec"
    )
    assert code == 0 and "decoded 2 log-mel spectrograms (64, 51)" in out
    assert sorted(p.name for p in (w / "adec").iterdir()) == ["a0.npy", "a0.png", "a1.npy", "a1.png"]
    mel = np.load(w / "adec" / "a0.npy")
    assert mel.shape == (64, 51) and mel.dtype == np.float32 and -1.71 < mel.min() <= mel.max() < 1.76
    assert Image.open(w / "adec" / "a0.png").size == (51, 64)


@pytest.mark.timeout(60)
def test_tokenize_audio_help_and_errors(workdir, audio_tokenizer, capsys):
    w, tok = workdir, audio_tokenizer
    with pytest.raises(SystemExit):
        main(["tokenize", "train", "--help"])
    assert "--modality {image,audio}" in capsys.readouterr().out
    code, _, err = _run(
        capsys, "tokenize", "encode", "--tokenizer", tok, w / "imgs/im0.png", "--out", w / "x.json"
    )
    assert (
        code != 0
        and "expected an audio file (.wav, .flac, .ogg)" in err
        and len(err.strip().splitlines()) == 1
    )
    code, _, err = _run(
        capsys, "tokenize", "train", "--modality", "audio", "--images", w / "imgs", "--out", w / "t"
    )
    assert code != 0 and "--images is for --modality image" in err
    np.save(w / "abad.npy", np.zeros((1, 8, 8), dtype=np.int32))
    code, _, err = _run(
        capsys, "tokenize", "decode", "--tokenizer", tok, w / "abad.npy", "--out-dir", w / "x"
    )
    assert code != 0 and "this tokenizer needs (16, 13)" in err


@pytest.mark.timeout(120)
def test_train_unified_with_audio_tokenizer_and_audio_caption(workdir, tokenizer, audio_tokenizer, capsys):
    """--audio-tokenizer adds the audio_caption task and audio_tokenizer/; generate --task audio-caption reads
    WAV files (mono 16 kHz and stereo 44.1 kHz) with it."""
    w = workdir
    args = ["train-unified", "--out", w / "amodel", "--tokenizer", tokenizer, "--image-size", "16", "--samples", "16",
            "--steps", "2", "--warmup", "1", "--dim", "16", "--depth", "1", "--heads", "2", "--text-vocab", "96",
            "--threads", "1"]  # fmt: skip
    code, _, err = _run(capsys, *args, "--audio-tokenizer", w / "tok")
    assert code != 0 and "has no frontend.json: an image tokenizer, not an audio one" in err
    code, out, _ = _run(capsys, *args, "--audio-tokenizer", audio_tokenizer)
    assert code == 0 and "trained 2 steps" in out
    info = json.loads((w / "amodel" / "model" / "train.json").read_text())
    assert info["tasks"] == {"caption": 16, "image": 18, "vqa": info["tasks"]["vqa"], "audio_caption": 16}
    vocab = json.loads((w / "amodel" / "model" / "vocab.json").read_text())
    assert (vocab["n_audio"], vocab["tokens_per_audio"]) == (8, 16 * 13)
    assert vocab["special_tokens"][-3:] == ["<boa>", "<eoa>", "<audio_caption>"]
    assert (w / "amodel" / "model" / "audio_tokenizer" / "frontend.json").is_file()
    code, out, _ = _run(capsys, "generate", "--model", w / "amodel", "--task", "audio-caption", "--audio", w / "wavs",
                        "--max-new-tokens", "4", "--json", w / "acap.json")  # fmt: skip
    rows = json.loads((w / "acap.json").read_text())
    assert (
        code == 0 and [r["audio"][-6:] for r in rows] == ["a0.wav", "a1.wav"] and len(out.splitlines()) == 2
    )


def test_train_unified_rejects_a_bad_decoder_option_before_any_work(tmp_path, capsys):
    code, out, err = _run(
        capsys, "train-unified", "--out", tmp_path / "m", "--depth", "1", "--hierarchical-layers", "2"
    )
    assert code != 0 and "hierarchical_layers = 2: expected an integer in [0, depth=1]" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.timeout(60)
def test_tokenize_audio_front_end_flags(tmp_path, capsys):
    code, out, _ = _run(
        capsys, "tokenize", "train", "--modality", "audio", "--out", tmp_path / "t", "--steps", "2",
        "--train-images", "4", "--eval-images", "2", "--channels", "4", "--codebook-size", "8", "--code-dim", "4",
        "--threads", "1", "--n-mels", "32", "--hop", "320", "--clip-seconds", "0.25",
    )  # fmt: skip
    assert code == 0
    meta = json.loads((tmp_path / "t" / "frontend.json").read_text())
    assert meta == {"modality": "audio", "sample_rate": 16000, "seconds": 0.25, "n_mels": 32, "hop": 320}
    # 32 mels / 4 = 8 rows; 1 + 4000 // 320 = 13 frames, padded to 16, / 4 = 4 columns
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["tokens_per_image"] == 8 * 4
    code, _, err = _run(capsys, "tokenize", "train", "--out", tmp_path / "i", "--n-mels", "32")
    assert code != 0 and "--n-mels, --hop, --clip-seconds and --sample-rate need --modality audio" in err
    code, _, err = _run(
        capsys, "tokenize", "train", "--modality", "audio", "--out", tmp_path / "a", "--n-mels", "30"
    )
    assert code != 0 and "n_mels a positive multiple of 4" in err and "n_mels=30" in err
