"""Issue 15: a user's own files (PNG images, WAV audio, captions, labels; some samples missing a modality, a few
broken) train a cross-attention fusion model through `mmfusion train`, resume bitwise after SIGKILL, evaluate;
and the synthetic VQA task written to disk as JSONL trains exactly like the in-memory synthetic source."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import load_file

from faults import kill_after
from mmfusion.data.synthetic import Obj, Scene, SyntheticWorld, WorldConfig

LABELS = ("red", "green", "blue")


def write_corpus(root: Path, n: int, split: str, seed: int) -> Path:
    """n samples: a coloured shape (PNG), its tone (WAV), a caption, the colour as label. Every 7th sample has
    no audio, every 5th no image, every 3rd no text; three lines are broken (a corrupt PNG, a missing file, a
    WAV that is not audio). Returns the manifest."""
    world = SyntheticWorld(WorldConfig(seed=seed))
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        colour = LABELS[int(rng.integers(len(LABELS)))]
        scene = Scene((Obj(("circle", "square")[i % 2], colour, "large", float(rng.uniform(0.3, 0.7)), 0.5),))
        row: dict = {"id": f"{split}-{i}", "label": colour}
        if i % 5:
            path = f"{split}/{i}.png"
            Image.fromarray(world.render_image(scene)).save(root / path)
            row["image"] = path
        if i % 7:
            path = f"{split}/{i}.wav"
            sf.write(
                root / path, world.render_audio(scene, rng), world.config.audio_sample_rate, subtype="PCM_16"
            )
            row["audio"] = path
        if i % 3:
            row["text"] = f"a {('round', 'boxy')[i % 2]} thing"  # says nothing about the colour
        lines.append(row)
    (root / split / "broken.png").write_bytes(b"\x89PNG not really")
    (root / split / "noise.wav").write_bytes(b"RIFF....WAVEfmt nope")
    lines += [
        {"id": f"{split}-bad-png", "image": f"{split}/broken.png", "label": "red"},
        {"id": f"{split}-missing", "image": f"{split}/nowhere.png", "label": "red"},
        {"id": f"{split}-bad-wav", "audio": f"{split}/noise.wav", "label": "blue"},
    ]
    manifest = root / f"{split}.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return {
        split: write_corpus(root, n, split, seed)
        for split, n, seed in (("train", 192, 0), ("val", 48, 1), ("test", 96, 2))
    }


def fusion_config(tmp_path: Path, corpus: dict[str, Path]) -> Path:
    cfg = {
        "name": "own",
        "out_dir": "runs",
        "seed": 0,
        "data": {"source": "jsonl", **{k: str(v) for k, v in corpus.items()}, "target": {"field": "label"}},
        "model": {
            "kind": "fusion",
            "encoders": {"image": "tiny", "audio": "tiny", "text": "tiny"},
            "dim": 32,
            "fusion": "cross_attention",
            "modality_dropout": 0.2,
        },
        "train": {
            "steps": 16,
            "batch_size": 32,
            "lr": 3.0e-3,
            "warmup_steps": 2,
            "precision": "fp32",
            "device": "cpu",
            "threads": 1,
            "deterministic": True,
            "checkpoint_every": 4,
            "log_every": 2,
            "progress": False,
        },
        "eval": {"batch_size": 64},
    }
    path = tmp_path / "own.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.timeout(400)
def test_own_files_train_a_fusion_model_resume_bitwise_and_evaluate(mmfusion, corpus, tmp_path):
    recipe = fusion_config(tmp_path, corpus)
    ref = mmfusion("train", "--config", recipe, cwd=tmp_path, timeout=150)
    run = tmp_path / "runs" / "own"
    metrics = json.loads((run / "metrics.json").read_text())
    # three classes named after the labels (sorted), saved with the model
    assert json.loads((run / "model" / "config.json").read_text())["model"]["classes"] == sorted(LABELS)
    assert {
        "accuracy_all",
        "accuracy_without_image",
        "accuracy_without_audio",
        "accuracy_without_text",
    } <= set(metrics)
    # nothing is lost silently: of 96 + 3 lines, sample 0 has no input at all (0 is a multiple of 3, 5 and 7)
    # and the three broken lines are unreadable; all four are counted by reason
    assert metrics["n"] == 95
    assert metrics["skipped"] == {
        "missing_modality": 1,
        "corrupt_image": 1,
        "missing_file": 1,
        "corrupt_audio": 1,
    }
    errors = json.loads((run / "data_errors.json").read_text())
    assert errors["corrupt_image"] >= 1 and errors["missing_file"] >= 1 and errors["corrupt_audio"] >= 1, (
        errors
    )
    assert "run directory" in ref.stdout
    # SIGKILL after step 10, resume from the step-8 checkpoint: the same weights as the uninterrupted run
    killed = mmfusion(
        "train",
        "--config",
        recipe,
        "--set",
        "name=own_killed",
        "--no-eval",
        *kill_after(10),
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert killed.returncode in (-9, 137), killed.stderr
    resumed = mmfusion(
        "train",
        "--config",
        recipe,
        "--set",
        "name=own_killed",
        "--no-eval",
        "--resume",
        cwd=tmp_path,
        timeout=120,
    )
    assert "resumed from" in resumed.stdout and "step 8" in resumed.stdout, resumed.stdout
    a = load_file(str(run / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "own_killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(300)
def test_the_vqa_task_on_disk_trains_exactly_like_the_in_memory_source(mmfusion, tmp_path):
    from mmfusion.data.synthetic import VQA_ANSWERS

    for split, n in (("train", 256), ("val", 16), ("test", 64)):
        mmfusion("data", "synth", "--task", "vqa", "--out", "vqa", "--n", n, "--split", split, cwd=tmp_path)
    row = json.loads((tmp_path / "vqa" / "train.jsonl").read_text().splitlines()[0])
    assert {"image", "question", "answer"} <= set(row) and "label" not in row
    train = {
        "steps": 8,
        "batch_size": 32,
        "warmup_steps": 2,
        "threads": 1,
        "precision": "fp32",
        "device": "cpu",
    }
    train |= {"deterministic": True, "progress": False}
    model = {"kind": "fusion", "encoders": {"image": "tiny", "text": "tiny"}}
    memory = {"source": "synthetic", "synthetic": {"task": "vqa", "n_train": 256, "n_val": 16, "n_test": 64}}
    disk = {"source": "jsonl", **{s: f"vqa/{s}.jsonl" for s in ("train", "val", "test")}}
    disk |= {"inputs": {"text": "question"}, "target": {"field": "answer", "classes": list(VQA_ANSWERS)}}
    for name, data in (("memory", memory), ("disk", disk)):
        cfg = {"name": name, "seed": 0, "data": data, "model": model, "train": train}
        (tmp_path / f"{name}.yaml").write_text(json.dumps(cfg))
        mmfusion("train", "--config", f"{name}.yaml", cwd=tmp_path, timeout=120)
    runs = tmp_path / "runs"
    a = load_file(str(runs / "memory" / "model" / "model.safetensors"))
    b = load_file(str(runs / "disk" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((runs / n / "metrics.json").read_text()) for n in ("memory", "disk"))
    assert ma["accuracy_all"] == mb["accuracy_all"] and ma["n"] == mb["n"] == 64


def unified_config(tmp_path: Path, corpus: dict[str, Path]) -> Path:
    cfg = {
        "name": "uni",
        "seed": 0,
        "data": {"source": "jsonl", **{k: str(v) for k, v in corpus.items()}},
        "model": {
            "kind": "unified",
            "width": 32,
            "depth": 1,
            "heads": 2,
            "text_vocab_size": 64,
            "image_tokenizer": {"kind": "vq", "steps": 20, "codebook_size": 16, "channels": 8, "code_dim": 8},
        },
        "train": {
            "steps": 8,
            "batch_size": 8,
            "lr": 3.0e-3,
            "warmup_steps": 2,
            "precision": "fp32",
            "device": "cpu",
            "threads": 1,
            "deterministic": True,
            "checkpoint_every": 4,
            "log_every": 2,
            "progress": False,
        },
        "eval": {"max_rows": 8},
    }
    path = tmp_path / "uni.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.timeout(400)
def test_own_files_train_a_unified_model_resume_bitwise_and_evaluate(mmfusion, corpus, tmp_path):
    """The same corpus trains the unified decoder through `mmfusion train` (image + caption rows; rows of no task
    are counted), resumes bitwise after SIGKILL, evaluates."""
    recipe = unified_config(tmp_path, corpus)
    mmfusion("train", "--config", recipe, cwd=tmp_path, timeout=180)
    run = tmp_path / "runs" / "uni"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["caption_n"] > 0 and 0.0 <= metrics["caption_bleu"] <= 100.0, metrics
    assert json.loads((run / "model" / "config.json").read_text())["model_type"] == "unified"
    errors = json.loads((run / "data_errors.json").read_text())
    # audio + caption rows need an audio tokenizer; image-only and label-only rows (the broken lines among
    # them) are no task's row: both counted by reason, each time the sampler draws them
    assert errors.get("no_audio_tokenizer", 0) >= 1 and errors.get("missing_modality", 0) >= 1, errors
    killed = mmfusion(
        "train", "--config", recipe, "--set", "name=uni_killed", "--no-eval", *kill_after(6), cwd=tmp_path,
        timeout=150, check=False,
    )  # fmt: skip
    assert killed.returncode in (-9, 137), killed.stderr
    resumed = mmfusion(
        "train",
        "--config",
        recipe,
        "--set",
        "name=uni_killed",
        "--no-eval",
        "--resume",
        cwd=tmp_path,
        timeout=150,
    )
    assert "resumed from" in resumed.stdout, resumed.stdout
    a = load_file(str(run / "model" / "decoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "uni_killed" / "model" / "decoder" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
