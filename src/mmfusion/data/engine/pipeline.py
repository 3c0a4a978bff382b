"""`mmfusion data build`: source -> detect -> process -> align -> assess -> de-duplicate -> shards + reports.

    SRC (folder tree | JSONL | shards)
      │ scan: list samples (pair loose files by name), hash every input ──> build id
      ▼
    chunks of `chunk_size` inputs ──(worker processes / Ray)──> per chunk, each sample:
      (a) detect modality from bytes   (b) decode + normalise   (d) quality checks
      (c) with --model: CLIP-style image-caption score, image embedding
      → .work/chunk-NNNNNN.tar (candidates, shard record format) + .json (every sample's verdict)
      ▼
    (e) de-duplicate candidates in input order (content hash, pHash, embedding cosine)
      ▼
    accepted → shard-NNNNNN.tar (copied from the chunk tars) + manifest.json
    rejected → rejected.jsonl + report.html + report.png

The parts: `scan.py` (source -> sample specs), `stages.py` (the per-sample stages and `run_chunk`, run in the
workers), `output.py` (shards, manifest.json, rejected.jsonl), `report.py` (report.html / .png); this module
runs them in order.

Resuming: a chunk whose .json records the same key (hash of config + its inputs' hashes) is not processed
again, and a shard whose recorded ids and SHA-256 match the plan is not rewritten. `.work/` is that cache;
delete it to reclaim space once a build is final.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from .align import ModelLoader
from .build_config import BuildConfig
from .dedup import DedupItem, find_duplicates, sha256
from .output import read_json, write_manifest, write_rejected, write_shards
from .scan import SampleSpec, scan
from .stages import run_chunk, run_chunks_local

FORMAT_VERSION = 1


@dataclass
class BuildResult:
    """What a build did: build id, output folder, counts and per-stage seconds / work skipped."""

    build_id: str
    out: Path
    inputs: int
    accepted: int
    rejected: Counter
    shards: list[str]
    modalities: Counter
    mislabelled: int
    chunks_processed: int
    chunks_skipped: int
    shards_written: int
    shards_skipped: int
    seconds: dict[str, float]
    workers: int
    samples_processed: int  # inputs processed in this run (not taken from a finished chunk)
    process_cpu_s: float  # CPU seconds the process stage took in the workers (this run's chunks only)


def config_dict(cfg: BuildConfig) -> dict[str, Any]:
    """The config as stored in the manifest (model as given)."""
    return dataclasses.asdict(cfg)


def build_id(specs: list[SampleSpec], cfg: BuildConfig) -> str:
    """SHA-256 of the config (with the model's weight hashes) and every input's id and member hashes."""
    return sha256(
        json.dumps({"config": _config_fingerprint(cfg), "inputs": [[s.id, s.hashes] for s in specs]}).encode()
    )


def _config_fingerprint(cfg: BuildConfig) -> dict[str, Any]:
    out = {**config_dict(cfg), "format_version": FORMAT_VERSION}
    if cfg.model is not None:
        folder = Path(cfg.model)
        out["model"] = {p.name: sha256(p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}
    if cfg.concept_filter is not None:
        out["concept_filter"] = sha256(Path(cfg.concept_filter).read_bytes())
    return out


def _chunk_key(specs: list[SampleSpec], cfg_hash: str) -> str:
    return sha256(json.dumps([cfg_hash, [[s.index, s.id, s.hashes, s.error] for s in specs]]).encode())


def build(
    src: str | os.PathLike,
    out: str | os.PathLike,
    cfg: BuildConfig | None = None,
    workers: int | None = None,
    engine: str = "local",
    chunk_size: int = 256,
    progress: bool = False,
    load_model: ModelLoader | None = None,
) -> BuildResult:
    """Build a dataset folder from SRC (see the module docstring); resumes from out/.work when present.

    With cfg.model set, `load_model` (a picklable callable: model folder -> model; `mmfusion.load_model`)
    loads it in each worker for pair scoring and embedding de-duplication (stage c)."""
    from tqdm import tqdm

    from .report import write_report

    cfg = cfg if cfg is not None else BuildConfig()
    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine {engine!r}: expected 'local' or 'ray'")
    if cfg.model is not None and load_model is None:
        raise ConfigError(
            f"build config model = {cfg.model!r}: pass load_model (mmfusion.load_model) to load it; "
            "the data engine does not import the models"
        )
    if chunk_size < 1:
        raise ConfigError(f"chunk_size = {chunk_size}: expected a positive number")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"--workers {workers}: expected a positive number")
    src, out = Path(src), Path(out)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    specs = scan(src, skip=out.resolve(), progress=progress)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    bid = build_id(specs, cfg)
    cfg_hash = sha256(json.dumps(_config_fingerprint(cfg)).encode())
    seconds["scan"] = time.perf_counter() - t

    t = time.perf_counter()
    chunks = [specs[s : s + chunk_size] for s in range(0, len(specs), chunk_size)]
    keys = [_chunk_key(c, cfg_hash) for c in chunks]
    todo = [
        i
        for i, k in enumerate(keys)
        if (read_json(work / f"chunk-{i:06d}.json") or {}).get("key") != k
        or not (work / f"chunk-{i:06d}.tar").is_file()
    ]
    tasks = [(i, chunks[i], cfg, str(work), keys[i], load_model) for i in todo]
    bar = tqdm(total=sum(len(chunks[i]) for i in todo), desc="process", unit="sample", disable=not progress)
    cpu: list[tuple[int, float]] = []  # (samples, CPU seconds) per chunk processed in this run

    def done(r: dict[str, float]) -> None:
        bar.update(int(r["n"]))
        cpu.append((int(r["n"]), r["cpu_s"]))

    if engine == "ray":
        from .ray_engine import run_chunks_on_ray

        run_chunks_on_ray(run_chunk, tasks, workers, done)
    else:
        run_chunks_local(run_chunk, tasks, workers, done)
    bar.close()
    verdicts = [v for i in range(len(chunks)) for v in read_json(work / f"chunk-{i:06d}.json")["samples"]]
    seconds["process"] = time.perf_counter() - t

    t = time.perf_counter()
    _deduplicate(verdicts, cfg, progress)
    accepted = [v for v in verdicts if not v["reasons"]]
    seconds["dedup"] = time.perf_counter() - t

    t = time.perf_counter()
    shards, written = write_shards(accepted, out, work, cfg.shard_size, chunk_size, progress)
    rejected = [v for v in verdicts if v["reasons"]]
    head = {
        "format_version": FORMAT_VERSION,
        "build_id": bid,
        "source": str(src),
        "config": config_dict(cfg),
        "counts": {"inputs": len(verdicts), "accepted": len(accepted), "rejected": len(rejected)},
        "shards": shards,
    }
    write_manifest(out, head, accepted)
    write_rejected(out, rejected)
    seconds["write"] = time.perf_counter() - t
    result = BuildResult(
        build_id=bid,
        out=out,
        inputs=len(verdicts),
        accepted=len(accepted),
        rejected=Counter(r for v in rejected for r in {r for r, _ in v["reasons"]}),
        shards=shards,
        modalities=Counter("+".join(v["modalities"]) for v in accepted),
        mislabelled=sum(bool(v["notes"]) for v in verdicts),
        chunks_processed=len(todo),
        chunks_skipped=len(chunks) - len(todo),
        shards_written=written,
        shards_skipped=len(shards) - written,
        seconds=seconds,
        samples_processed=sum(n for n, _ in cpu),
        process_cpu_s=sum(c for _, c in cpu),
        workers=workers,
    )
    t = time.perf_counter()
    write_report(result, verdicts, out)
    seconds["report"] = time.perf_counter() - t
    return result


def _deduplicate(verdicts: list[dict], cfg: BuildConfig, progress: bool) -> None:
    """Stage (e) plus duplicate ids, in place: a repeat gets a reason naming the sample it repeats."""
    from tqdm import tqdm

    seen: set[str] = set()
    for v in verdicts:
        if v["id"] in seen:
            v["reasons"].append(["duplicate_id", f"id {v['id']!r} appears earlier in the source"])
        seen.add(v["id"])
    cands = [v for v in verdicts if not v["reasons"]]
    h = [v["hashes"] for v in cands]
    items = [
        DedupItem(v["id"], x["content"], x.get("phash"), x.get("colour"), v.get("embedding"))
        for v, x in zip(cands, h)
    ]
    min_cos = cfg.dedup_cosine if cfg.model is not None else None
    with tqdm(total=len(items), desc="dedup", unit="sample", disable=not progress) as bar:
        dups = find_duplicates(items, cfg.phash_distance, min_cos, cfg.colour_tolerance, bar.update)
    for i, (reason, detail) in dups.items():
        cands[i]["reasons"].append([reason, detail])


__all__ = ["FORMAT_VERSION", "BuildConfig", "BuildResult", "build", "build_id", "config_dict"]
