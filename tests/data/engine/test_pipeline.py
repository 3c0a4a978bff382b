"""Build pipeline end to end on a hand-made messy source tree: every input lands where it should, with
the right reason; resume, parallel and Ray-free engines give identical output; JSONL and shard sources."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image, ImageOps

from mmfusion import load_model
from mmfusion.data.engine import pipeline
from mmfusion.data.engine.build_config import BuildConfig
from mmfusion.data.engine.pipeline import build, build_id
from mmfusion.data.engine.scan import scan
from mmfusion.data.engine.stages import run_chunk
from mmfusion.data.sources import WebDatasetSource
from mmfusion.errors import ConfigError

# sample id -> expected rejection reasons (empty = accepted)
EXPECTED = {
    "animals/cat": [],
    "animals/cat_copy": ["duplicate"],  # same image bytes and caption as animals/cat
    "animals/cat_recoded": ["near_duplicate"],  # cat re-encoded as JPEG, another caption
    "dog": [],
    "bird": [],  # audio + caption
    "beep": [],  # a WAV named beep.png: mislabelled, used as audio
    "combo": [],  # image + audio + caption
    "clip": [],  # video + caption
    "poem": [],  # caption only
    "broken": ["unreadable"],  # truncated JPEG
    "empty": ["empty_caption"],
    "quiet": ["silent_audio"],
    "latin": ["non_utf8_text"],
    "blank": ["blank_image"],
    "tiny": ["too_small"],
    "noise": ["garbled_caption"],
    "notes": ["unknown_format"],  # a .md file
    "twins": ["conflicting_files"],  # twins.png + twins.jpg
}


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A seeded smooth RGB image (random 6x6 colours upsampled): distinct pHashes for distinct seeds."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize((size, size), Image.Resampling.BICUBIC)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def tone(freq: float = 440.0, seconds: float = 0.5, sr: int = 8000, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(wave: np.ndarray, sr: int = 8000, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def make_messy_tree(root: Path) -> Path:
    """Write the tree described by EXPECTED under root and return root."""
    (root / "animals").mkdir(parents=True)
    files: dict[str, bytes | str] = {
        "animals/cat.png": encoded(smooth_image(1), "PNG"),
        "animals/cat.txt": "a cat  on a\tmat\n",
        "animals/cat_copy.png": encoded(smooth_image(1), "PNG"),
        "animals/cat_copy.txt": "a cat on a mat",
        "animals/cat_recoded.jpg": encoded(smooth_image(1), "JPEG", quality=95),
        "animals/cat_recoded.txt": "the same cat, recompressed",
        "dog.jpg": encoded(smooth_image(2), "JPEG", quality=90),
        "dog.txt": "a dog in the park",
        "bird.wav": wav_bytes(tone(880.0)),
        "bird.txt": "a bird sings",
        "beep.png": wav_bytes(tone(1000.0)),
        "beep.txt": "a short beep",
        "combo.png": encoded(smooth_image(3), "PNG"),
        "combo.flac": wav_bytes(tone(300.0), fmt="FLAC"),
        "combo.txt": "a drum and a picture",
        "poem.txt": "roses are red",
        "broken.jpg": encoded(smooth_image(4), "JPEG", quality=90)[:400],
        "broken.txt": "a broken picture",
        "empty.png": encoded(smooth_image(5), "PNG"),
        "empty.txt": "  \n\t ",
        "quiet.wav": wav_bytes(np.zeros(4000, dtype=np.float32)),
        "quiet.txt": "nothing to hear",
        "latin.png": encoded(smooth_image(6), "PNG"),
        "latin.txt": "caf\xe9 au lait".encode("latin-1"),
        "blank.png": encoded(Image.new("RGB", (64, 64), (128, 128, 128)), "PNG"),
        "blank.txt": "a grey wall",
        "tiny.png": encoded(smooth_image(7, size=8), "PNG"),
        "tiny.txt": "a tiny picture",
        "noise.png": encoded(smooth_image(8), "PNG"),
        "noise.txt": "#### 1234 $$$$ %%%%",
        "notes.md": "# notes about the data\n",
        "twins.png": encoded(smooth_image(9), "PNG"),
        "twins.jpg": encoded(smooth_image(10), "JPEG"),
    }
    clip = np.stack([np.asarray(smooth_image(20 + t, size=32)) for t in range(5)])
    buf = io.BytesIO()
    np.save(buf, clip, allow_pickle=False)
    files["clip.npy"] = buf.getvalue()
    files["clip.txt"] = "a moving picture"
    for rel, data in files.items():
        path = root / rel
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)
    return root


CFG = BuildConfig(image_size=64, min_image_side=16, shard_size=3)


def _files(folder: Path) -> dict[str, bytes]:
    """Every output file except the work cache and the report (which holds timings)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".work" not in p.parts and not p.name.startswith("report.")
    }


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    return make_messy_tree(tmp_path_factory.mktemp("messy"))


@pytest.fixture(scope="module")
def built(messy, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    return build(messy, out, CFG, workers=1, chunk_size=8), out


def _verdicts(out: Path) -> tuple[dict, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    return {s["id"]: s for s in manifest["samples"]}, {r["id"]: r for r in rejected}


def test_every_input_lands_where_expected_with_its_reason(built):
    result, out = built
    accepted, rejected = _verdicts(out)
    assert set(accepted).isdisjoint(rejected)
    assert set(accepted) | set(rejected) == set(EXPECTED)  # nothing lost, nothing invented
    assert sorted(accepted) == sorted(k for k, v in EXPECTED.items() if not v)
    assert {k: v["reasons"] for k, v in rejected.items()} == {k: v for k, v in EXPECTED.items() if v}
    assert rejected["latin"]["details"] == [
        "latin.txt: not UTF-8: byte 0xe9 at offset 3 (invalid continuation byte)"
    ]
    assert rejected["animals/cat_copy"]["details"] == ["same content as animals/cat"]
    assert rejected["animals/cat_recoded"]["details"][0].endswith("of animals/cat")
    assert rejected["broken"]["sources"] == ["broken.jpg", "broken.txt"]
    assert (result.inputs, result.accepted, len(result.shards)) == (18, 7, 3)


def test_mislabelled_wav_is_reported_and_used_as_audio(built):
    result, out = built
    accepted, _ = _verdicts(out)
    assert accepted["beep"]["modalities"] == ["audio", "text"]
    assert accepted["beep"]["notes"] == ["beep.png: mislabelled: name says image, content is audio (wav)"]
    assert result.mislabelled == 1
    assert "beep.png: mislabelled" in (out / "report.html").read_text()


def test_accepted_shards_read_back_normalised(built):
    _, out = built
    accepted, _ = _verdicts(out)
    samples = {s["id"]: s for s in WebDatasetSource(out, on_error="fail")}
    assert sorted(samples) == sorted(accepted)
    cat = samples["animals/cat"]
    assert cat["text"] == "a cat on a mat"  # tab and double space cleaned
    assert cat["image"].shape == (64, 64, 3) and cat["image"].dtype == np.uint8
    bird = samples["bird"]
    assert bird["audio_sr"] == 16000
    # 0.5 s at 8 kHz resampled to 16 kHz, the leading zero crossing trimmed away: within a few samples
    assert abs(bird["audio"].shape[0] - 8000) <= 4
    assert samples["clip"]["video"].shape == (8, 64, 64, 3)
    assert set(samples["poem"]) == {"id", "text"}
    # the manifest says where each sample is
    names = {s["id"]: s["shard"] for s in json.loads((out / "manifest.json").read_text())["samples"]}
    with tarfile.open(out / names["dog"]) as tf:
        assert f"{accepted['dog']['key']}.png" in tf.getnames()


def test_report_counts_every_reason(built):
    result, out = built
    page = (out / "report.html").read_text()
    for reason in {r for v in EXPECTED.values() for r in v}:
        assert f"<td>{reason}</td><td>1</td>" in page
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.rejected == Counter(r for v in EXPECTED.values() for r in v)


def test_build_id_follows_inputs_and_config(messy, tmp_path):
    specs = scan(messy)
    bid = build_id(specs, CFG)
    assert build_id(scan(messy), CFG) == bid
    assert build_id(specs, dataclasses.replace(CFG, blank_std=3.0)) != bid
    copy = tmp_path / "copy"
    shutil.copytree(messy, copy)
    assert build_id(scan(copy), CFG) == bid  # content, not location
    (copy / "dog.txt").write_text("a dog in the garden")
    assert build_id(scan(copy), CFG) != bid


def test_resume_skips_finished_work_and_gives_identical_output(messy, built, tmp_path, monkeypatch):
    _, reference = built
    out = tmp_path / "out"
    calls = []

    def crash_on_third(chunk, *args):
        calls.append(chunk)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the build is interrupted while processing
        return run_chunk(chunk, *args)

    monkeypatch.setattr(pipeline, "run_chunk", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build(messy, out, CFG, workers=1, chunk_size=4)
    monkeypatch.undo()
    result = build(messy, out, CFG, workers=1, chunk_size=4)
    assert (result.chunks_skipped, result.chunks_processed) == (2, 3)  # 18 inputs in chunks of 4
    assert _files(out) == _files(reference)  # the chunking does not change the output

    (out / "shard-000001.tar").unlink()
    (out / ".work" / "chunk-000004.json").unlink()
    result = build(messy, out, CFG, workers=1, chunk_size=4)
    assert (result.chunks_processed, result.chunks_skipped) == (1, 4)
    assert (result.shards_written, result.shards_skipped) == (1, 2)
    assert _files(out) == _files(reference)


@pytest.mark.timeout(120)
def test_worker_processes_give_the_same_output(messy, built, tmp_path):
    _, reference = built
    result = build(messy, tmp_path / "par", CFG, workers=2, chunk_size=5)
    assert result.chunks_processed == 4
    assert _files(tmp_path / "par") == _files(reference)


def test_jsonl_source_keeps_annotations_and_reports_bad_lines(messy, tmp_path):
    lines = [
        {"id": "ok", "image": "dog.jpg", "text": " a dog ", "scene_key": "dog|park", "source": "web"},
        {"id": "gone", "image": "missing.png", "text": "a ghost"},
        {"id": "num", "text": 5},
        "{not json",
        {"id": "ok", "text": "the same id again"},
        {"id": "blank", "text": "", "audio": "bird.wav"},
    ]
    src = messy / "extra.jsonl"
    src.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    try:
        result = build(src, tmp_path / "j", CFG, workers=1)
    finally:
        src.unlink()
    accepted, rejected = _verdicts(tmp_path / "j")
    assert list(accepted) == ["ok"] and accepted["ok"]["sources"] == ["extra.jsonl:1", "dog.jpg"]
    assert rejected["ok"]["sources"] == ["extra.jsonl:5"]
    assert {k: r["reasons"] for k, r in rejected.items()} == {
        "gone": ["bad_source"],
        "num": ["bad_source"],
        "extra-4": ["bad_source"],
        "ok": ["duplicate_id"],  # the second "ok"; the first is accepted
        "blank": ["empty_caption"],
    }
    assert rejected["gone"]["details"] == ["line 2: field 'image': file missing.png not found"]
    (sample,) = WebDatasetSource(tmp_path / "j", on_error="fail")
    assert sample["text"] == "a dog" and sample["scene_key"] == "dog|park"
    assert sample["meta"] == {"source": "web"}
    assert result.accepted == 1


def test_shards_source_round_trips(built, tmp_path):
    _, out = built
    accepted, _ = _verdicts(out)
    result = build(out, tmp_path / "again", CFG, workers=1)
    again, rejected = _verdicts(tmp_path / "again")
    assert rejected == {} and sorted(again) == sorted(accepted)
    assert {k: v["hashes"]["text"] for k, v in again.items()} == {
        k: v["hashes"]["text"] for k, v in accepted.items()
    }
    assert result.accepted == 7


def test_truncated_shard_source_is_reported(built, tmp_path):
    _, out = built
    src = tmp_path / "cut"
    src.mkdir()
    data = (out / "shard-000000.tar").read_bytes()
    (src / "a.tar").write_bytes(data[: len(data) * 2 // 3])
    build(src, tmp_path / "o", CFG, workers=1)
    accepted, rejected = _verdicts(tmp_path / "o")
    assert 1 <= len(accepted) < 3  # what was before the cut survives
    (row,) = [r for r in rejected.values() if r["reasons"] == ["bad_source"]]
    assert row["id"] == "a.tar" and "truncated" in row["details"][0]


def test_model_scores_pairs_and_rejects_misaligned(make_tiny_model, tmp_path):
    model = make_tiny_model()
    folder = model.save_pretrained(tmp_path / "model")
    src = tmp_path / "pairs"
    src.mkdir()
    captions = ["a small red circle", "a large blue square", "a small green triangle"]
    images = [np.asarray(smooth_image(40 + i)) for i in range(3)]
    for i, (img, cap) in enumerate(zip(images, captions)):
        Image.fromarray(img).save(src / f"p{i}.png")
        (src / f"p{i}.txt").write_text(cap)
    # expected scores: the same preprocessing (resize to 64) then the model's own encoders
    processed = [
        np.asarray(ImageOps.fit(Image.fromarray(x), (64, 64), Image.Resampling.LANCZOS)) for x in images
    ]
    scores = (model.encode_image(processed) * model.encode_text(captions)).sum(1).numpy()
    cut = float(np.sort(scores)[1]) - 1e-4  # the lowest-scoring pair falls under the threshold
    cfg = dataclasses.replace(CFG, model=str(folder), min_alignment=cut, dedup_cosine=1.0)
    with pytest.raises(ConfigError, match=r"pass load_model \(mmfusion.load_model\)"):
        build(src, tmp_path / "out", cfg, workers=1)  # the data engine does not import the models
    build(src, tmp_path / "out", cfg, workers=1, load_model=load_model)
    accepted, rejected = _verdicts(tmp_path / "out")
    worst = f"p{int(scores.argmin())}"
    assert list(rejected) == [worst] and rejected[worst]["reasons"] == ["misaligned"]
    for sid, s in accepted.items():
        assert s["align_score"] == pytest.approx(float(scores[int(sid[1:])]), abs=1e-5)
