"""The per-sample stages of `mmfusion data build`, run in the workers: (a) detect, (b) decode + normalise,
(d) quality checks on each sample, (c) pair scoring with a model on a chunk's candidates, and `run_chunk`,
which writes one chunk's candidates and verdicts to the work folder (the local process pool and Ray run
exactly this function)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import webdataset as wds

from ...errors import ConfigError
from ..writers import wds_record
from .align import ModelLoader, PairScorer, pair_scores
from .build_config import BuildConfig
from .dedup import colour_signature, perceptual_hash, sample_hash, sha256
from .detect import detect
from .output import record_key, write_json
from .process import Unusable, process_audio, process_image, process_text, process_video
from .quality import audio_issues, image_issues, text_issues
from .scan import SampleSpec


def process_sample(spec: SampleSpec, cfg: BuildConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Stages (a), (b) and (d) on one sample -> (verdict record, sample dict for the shard writer or None).

    The verdict has id, sources, modalities, hashes, reasons ([reason, detail] pairs; empty = candidate) and
    notes (mislabelled files)."""
    verdict: dict[str, Any] = {
        "index": spec.index,
        "id": spec.id,
        "sources": spec.sources,
        "modalities": [],
        "hashes": {},
        "reasons": [],
        "notes": [],
    }
    reasons: list[list[str]] = verdict["reasons"]
    if spec.error:
        reasons.append(list(spec.error))
        return verdict, None
    if not spec.members:
        reasons.append(["bad_source", "no media file or caption"])
        return verdict, None
    sample: dict[str, Any] = {"id": spec.id, **spec.annotations}
    for m in spec.members:
        try:
            data = m.read()
        except OSError as e:  # removed or unreadable since the scan
            reasons.append(["unreadable", f"{m.name}: cannot read: {e.strerror or e}"])
            continue
        det = detect(data, m.name)
        kind = det.modality if data else m.declared  # empty: what the name / field says (stage b reports it)
        note = det.note(m.name)
        if note:
            verdict["notes"].append(note)
        if kind == "text" and m.declared != "text":
            reasons.append(["unknown_format", f"{m.name}: plain text, but its name is not a caption (.txt)"])
            continue
        if kind == "unsupported":
            reasons.append(["unsupported_format", f"{m.name}: {det.format} video needs PyAV, not installed"])
            continue
        if kind is None:
            reasons.append(["unknown_format", f"{m.name}: content matches no supported format"])
            continue
        if kind in verdict["modalities"]:
            reasons.append(["conflicting_files", f"{m.name}: a second {kind} file for this sample"])
            continue
        verdict["modalities"].append(kind)
        try:
            issues = _process_member(kind, data, cfg, sample)
        except Unusable as u:
            issues = [(u.reason, u.detail)]
        reasons += [[r, f"{m.name}: {d}"] for r, d in issues]
        # text is hashed after cleaning, so captions that differ only in spacing are exact duplicates
        verdict["hashes"][kind] = sha256(sample.get("text", "").encode()) if kind == "text" else sha256(data)
    verdict["modalities"].sort()
    if reasons:
        return verdict, None
    verdict["hashes"]["content"] = sample_hash(verdict["hashes"])
    if "image" in sample:
        verdict["hashes"]["phash"] = perceptual_hash(sample["image"])
        verdict["hashes"]["colour"] = colour_signature(sample["image"])
    return verdict, sample


def _process_member(
    kind: str, data: bytes, cfg: BuildConfig, sample: dict[str, Any]
) -> list[tuple[str, str]]:
    if kind == "image":
        sample["image"], original = process_image(data, cfg.image_size)
        return image_issues(sample["image"], original, cfg.min_image_side, cfg.blank_std)
    if kind == "audio":
        wave, _, peak = process_audio(data, cfg.sample_rate, cfg.silence_level, cfg.max_audio_seconds)
        sample["audio"], sample["audio_sr"] = wave, cfg.sample_rate
        return audio_issues(wave, cfg.sample_rate, peak, cfg.silence_level, cfg.min_audio_seconds)
    if kind == "video":
        sample["video"] = process_video(data, cfg.video_frames, cfg.image_size)
        return []
    sample["text"] = process_text(data)
    return text_issues(sample["text"], cfg.max_caption_chars, cfg.min_letter_ratio)


def score_alignment(
    verdicts: list[dict], samples: list[dict | None], cfg: BuildConfig, load_model: ModelLoader
) -> None:
    """Stage (c) with cfg.model (loaded once per process by `load_model`): image embeddings (for
    de-duplication) and image-caption scores on the candidates, in place; a pair under cfg.min_alignment
    becomes `misaligned`."""
    scorer = PairScorer.cached(cfg.model, load_model)  # type: ignore[arg-type]
    with_image = [i for i, s in enumerate(samples) if s is not None and "image" in s]
    img = scorer.embed_images([samples[i]["image"] for i in with_image])  # type: ignore[index]
    for i, e in zip(with_image, img):
        verdicts[i]["embedding"] = [float(x) for x in e]
    pairs = [k for k, i in enumerate(with_image) if "text" in samples[i]]  # type: ignore[operator]
    txt = scorer.embed_texts([samples[with_image[k]]["text"] for k in pairs])  # type: ignore[index]
    for k, score in zip(pairs, pair_scores(img[pairs], txt)):
        i = with_image[k]
        verdicts[i]["align_score"] = round(float(score), 6)
        if score < cfg.min_alignment:
            verdicts[i]["reasons"].append(
                ["misaligned", f"image-caption score {score:.3f} < {cfg.min_alignment}"]
            )
            samples[i] = None
    if cfg.concept_filter is not None:
        apply_filters(verdicts, samples, cfg.concept_filter, with_image, img, scorer)


def apply_filters(verdicts, samples, path: str, with_image: list[int], img, scorer: PairScorer) -> None:
    """The concept filters of `path` (mmfusion.safety.filters, normal level) on each candidate's image (rows
    `with_image`, embeddings `img`) and caption, in place: a blocked sample becomes `filtered`, each blocking modality, concept and score named."""
    from ...safety.filters import ConceptFilters

    filters = ConceptFilters.load(path)
    keep = [k for k, i in enumerate(with_image) if samples[i] is not None]  # not rejected as misaligned
    with_image, img = [with_image[k] for k in keep], img[keep]
    with_text = [i for i, s in enumerate(samples) if s is not None and "text" in s]
    txt = scorer.embed_texts([samples[i]["text"] for i in with_text])  # type: ignore[index]
    blocked: set[int] = set()
    for modality, rows, emb in (("image", with_image, img), ("text", with_text, txt)):
        if not rows:
            continue
        scores = filters.scores(emb)
        for k, (i, names) in enumerate(zip(rows, filters.check(modality, emb))):
            if names:
                cols = [j for j, c in enumerate(filters.concepts) if c.name in names]
                detail = ", ".join(f"{filters.concepts[j].name} {scores[k, j]:.3f}" for j in cols)
                verdicts[i]["reasons"].append(["filtered", f"{modality}: {detail}"])
                blocked.add(i)
    for i in blocked:
        samples[i] = None


def run_chunk(
    chunk: int,
    specs: list[SampleSpec],
    cfg: BuildConfig,
    work: str,
    key: str,
    load_model: ModelLoader | None = None,
) -> dict[str, float]:
    """Process one chunk of inputs into work/chunk-NNNNNN.{tar,json}, written atomically; returns its size
    and the CPU seconds it took (n, cpu_s). `load_model` loads cfg.model when one is set (see `build`).

    A plain function of its arguments, so the local process pool and Ray run the same thing."""
    cpu = time.process_time()
    results = [process_sample(s, cfg) for s in specs]
    verdicts, samples = [r[0] for r in results], [r[1] for r in results]
    if cfg.model is not None:
        import torch

        torch.set_num_threads(1)  # one worker per core
        if load_model is None:
            raise ConfigError(f"build config model = {cfg.model!r}: pair scoring needs a load_model callable")
        score_alignment(verdicts, samples, cfg, load_model)
    base = Path(work) / f"chunk-{chunk:06d}"
    tmp = base.with_suffix(".tar.tmp")
    with wds.TarWriter(str(tmp), encoder=False, mtime=0) as writer:
        for v, s in zip(verdicts, samples):
            if s is not None:
                writer.write(wds_record(s, record_key(v["index"])))
    tmp.replace(base.with_suffix(".tar"))
    write_json(base.with_suffix(".json"), {"key": key, "samples": verdicts})
    return {"n": len(specs), "cpu_s": time.process_time() - cpu}


def run_chunks_local(
    fn: Callable[..., dict], tasks: list[tuple], workers: int, done: Callable[[dict], Any]
) -> None:
    """Run fn(*task) for every task: in this process with one worker, else in a ProcessPoolExecutor."""
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            done(fn(*task))
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        for fut in as_completed([pool.submit(fn, *task) for task in tasks]):
            done(fut.result())


__all__ = ["process_sample", "run_chunk", "run_chunks_local", "score_alignment"]
