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

Resuming: a chunk whose .json records the same key (hash of config + its inputs' hashes) is not processed
again, and a shard whose recorded ids and SHA-256 match the plan is not rewritten. `.work/` is that cache;
delete it to reclaim space once a build is final.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from ...errors import ConfigError, DataError
from ..sources import JsonlDataset, SampleProblem, annotation_fields, shard_samples, truncation, vqa_field
from ..writers import wds_record
from .align import PairScorer, pair_by_name, pair_scores
from .build_config import BuildConfig
from .dedup import DedupItem, colour_signature, find_duplicates, perceptual_hash, sample_hash, sha256
from .detect import declared_modality, detect
from .process import Unusable, process_audio, process_image, process_text, process_video
from .quality import audio_issues, image_issues, text_issues

FORMAT_VERSION = 1
MEDIA = ("image", "audio", "video")


# ---- sources -> sample specs -------------------------------------------------------------------------------
@dataclass
class Member:
    """One input of a sample: a file path (read by the worker) or inline bytes; `declared` is the modality
    its name or field claims; `name` is how reports refer to it."""

    name: str
    declared: str | None
    path: str | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:  # type: ignore[arg-type]
            return f.read()


@dataclass
class SampleSpec:
    """One sample to build: input position, id, members, source annotations (JSONL / shard JSON fields)
    and an error found while listing it (bad JSON, missing file), plus its members' SHA-256 hashes."""

    index: int
    id: str
    sources: list[str]
    members: list[Member] = field(default_factory=list)
    annotations: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None
    hashes: list[str] = field(default_factory=list)


def source_kind(src: Path) -> str:
    """ "folder" (a tree of media files), "jsonl" or "webdataset" (a .tar or a folder of only .tar files)."""
    if src.is_file():
        if src.suffix == ".jsonl":
            return "jsonl"
        if src.suffix == ".tar":
            return "webdataset"
        raise DataError(f"source {src}: expected a folder, a .jsonl manifest or a .tar shard")
    if src.is_dir():
        files = [p for p in src.iterdir() if not p.name.startswith(".")]
        if files and all(p.is_file() and p.suffix == ".tar" for p in files):
            return "webdataset"
        if (src / "manifest.json").is_file() and any(src.glob("shard-*.tar")):
            return "webdataset"  # a folder written by `mmfusion data build`: its shards
        return "folder"
    raise DataError(f"source {src} not found")


def _walk(root: Path, skip: Path | None) -> Iterator[Path]:
    """Files under root in sorted order; hidden files/folders (".*") and the output folder are left out."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (skip is None or (here / d).resolve() != skip)
        )
        yield from (here / f for f in sorted(filenames) if not f.startswith("."))


def _folder_specs(root: Path, skip: Path | None) -> Iterator[SampleSpec]:
    for i, (sid, files) in enumerate(pair_by_name(_walk(root, skip), root)):
        rels = [p.relative_to(root).as_posix() for p in files]
        members = [Member(rel, declared_modality(rel), path=str(p)) for rel, p in zip(rels, files)]
        yield SampleSpec(i, sid, rels, members)


def _jsonl_specs(path: Path) -> Iterator[SampleSpec]:
    ds = JsonlDataset(path)  # parses lines only; media are read by the workers
    for i, ((n, obj), sid) in enumerate(zip(ds.entries, ds.ids())):
        spec = SampleSpec(i, sid, [f"{path.name}:{n}"])
        if isinstance(obj, str):
            spec.error = ("bad_source", f"line {n}: {obj}")
            yield spec
            continue
        try:
            spec.annotations = annotation_fields(obj)
            if obj.get("vqa") is not None:
                spec.annotations["vqa"] = vqa_field(obj)
            if obj.get("text") is not None:
                if not isinstance(obj["text"], str):
                    raise SampleProblem("wrong_field_type", "text", "expected a string")
                spec.members.append(Member(f"{path.name}:{n}:text", "text", data=obj["text"].encode()))
            for m in MEDIA:
                if obj.get(m) is None:
                    continue
                rel = obj[m]
                if not isinstance(rel, str):
                    raise SampleProblem("wrong_field_type", m, "expected a path string")
                file = ds.root / rel
                if not file.is_file():
                    what = (
                        "is a folder (frame folders are not supported by build)"
                        if file.is_dir()
                        else "not found"
                    )
                    raise SampleProblem("missing_file", m, f"file {rel} {what}")
                spec.sources.append(rel)
                spec.members.append(Member(rel, m, path=str(file)))
        except SampleProblem as b:
            spec.error = ("bad_source", b.message(f"line {n}"))
        spec.annotations.pop("id", None)
        yield spec


def _wds_specs(src: Path) -> Iterator[SampleSpec]:
    urls = sorted(str(p) for p in src.glob("*.tar")) if src.is_dir() else [str(src)]
    i = 0
    for url in urls:
        name = Path(url).name
        try:
            for raw in shard_samples(url):
                key = raw["__key__"]
                spec = SampleSpec(i, key, [f"{name}:{key}"])
                i += 1
                for ext, data in sorted(raw.items()):
                    if ext.startswith("__"):
                        continue
                    if ext == "json":
                        try:
                            obj = json.loads(data.decode("utf-8"))
                            if not isinstance(obj, dict):
                                raise ValueError("expected a JSON object")
                            spec.annotations = annotation_fields(obj)
                            if obj.get("vqa") is not None:
                                spec.annotations["vqa"] = vqa_field(obj)
                            spec.id = spec.annotations.pop("id", key)
                            if isinstance(obj.get("text"), str) and "txt" not in raw:
                                spec.members.append(
                                    Member(f"{name}:{key}.json:text", "text", data=obj["text"].encode())
                                )
                        except (ValueError, SampleProblem) as e:
                            spec.error = ("bad_source", f"{name} key {key}: .json: {e}")
                        continue
                    spec.members.append(
                        Member(f"{name}:{key}.{ext}", declared_modality(f"x.{ext}"), data=data)
                    )
                yield spec
            problem = truncation(url)  # tarfile stops quietly at a cut header: say so
        except (OSError, tarfile.TarError, ValueError) as e:
            problem = f"cannot read shard: {e}"
        if problem:
            yield SampleSpec(
                i,
                name,
                [name],
                error=("bad_source", f"{name}: {problem} (samples from there on could not be read)"),
            )
            i += 1


def scan(src: Path, skip: Path | None = None, progress: bool = False) -> list[SampleSpec]:
    """Every sample of the source, in input order, with its members' SHA-256 hashes."""
    from tqdm import tqdm

    kind = source_kind(src)
    specs_it = {"folder": lambda: _folder_specs(src, skip), "jsonl": lambda: _jsonl_specs(src)}.get(
        kind, lambda: _wds_specs(src)
    )()
    specs = []
    for spec in tqdm(specs_it, desc="scan", unit="sample", disable=not progress):
        for m in spec.members:
            try:
                spec.hashes.append(sha256(m.read()))
            except OSError as e:
                spec.error = spec.error or ("bad_source", f"{m.name}: cannot read: {e}")
                spec.hashes.append("")
        specs.append(spec)
    if not specs:
        raise DataError(f"source {src} holds no samples")
    return specs


# ---- per-sample stages (run in workers) ---------------------------------------------------------------------
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


def score_alignment(verdicts: list[dict], samples: list[dict | None], cfg: BuildConfig) -> None:
    """Stage (c) with a model: image embeddings (for de-duplication) and image-caption scores on the
    candidates, in place; a pair under cfg.min_alignment becomes `misaligned`."""
    scorer = PairScorer.cached(cfg.model)  # type: ignore[arg-type]
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


def _key(index: int) -> str:
    return f"{index:09d}"


def run_chunk(chunk: int, specs: list[SampleSpec], cfg: BuildConfig, work: str, key: str) -> dict[str, float]:
    """Process one chunk of inputs into work/chunk-NNNNNN.{tar,json}, written atomically; returns its size
    and the CPU seconds it took (n, cpu_s).

    A plain function of its arguments, so the local process pool and Ray run the same thing."""
    cpu = time.process_time()
    results = [process_sample(s, cfg) for s in specs]
    verdicts, samples = [r[0] for r in results], [r[1] for r in results]
    if cfg.model is not None:
        import torch

        torch.set_num_threads(1)  # one worker per core
        score_alignment(verdicts, samples, cfg)
    base = Path(work) / f"chunk-{chunk:06d}"
    tmp = base.with_suffix(".tar.tmp")
    with wds.TarWriter(str(tmp), encoder=False, mtime=0) as writer:
        for v, s in zip(verdicts, samples):
            if s is not None:
                writer.write(wds_record(s, _key(v["index"])))
    tmp.replace(base.with_suffix(".tar"))
    _write_json(base.with_suffix(".json"), {"key": key, "samples": verdicts})
    return {"n": len(specs), "cpu_s": time.process_time() - cpu}


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (shards can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---- the build ----------------------------------------------------------------------------------------------
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
) -> BuildResult:
    """Build a dataset folder from SRC (see the module docstring); resumes from out/.work when present."""
    from tqdm import tqdm

    from .report import write_report

    cfg = cfg if cfg is not None else BuildConfig()
    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine {engine!r}: expected 'local' or 'ray'")
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
        if (_read_json(work / f"chunk-{i:06d}.json") or {}).get("key") != k
        or not (work / f"chunk-{i:06d}.tar").is_file()
    ]
    tasks = [(i, chunks[i], cfg, str(work), keys[i]) for i in todo]
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
    verdicts = [v for i in range(len(chunks)) for v in _read_json(work / f"chunk-{i:06d}.json")["samples"]]
    seconds["process"] = time.perf_counter() - t

    t = time.perf_counter()
    _deduplicate(verdicts, cfg, progress)
    accepted = [v for v in verdicts if not v["reasons"]]
    seconds["dedup"] = time.perf_counter() - t

    t = time.perf_counter()
    shards, written = _write_shards(accepted, out, work, cfg.shard_size, chunk_size, progress)
    rejected = [v for v in verdicts if v["reasons"]]
    manifest = {
        "format_version": FORMAT_VERSION,
        "build_id": bid,
        "source": str(src),
        "config": config_dict(cfg),
        "counts": {"inputs": len(verdicts), "accepted": len(accepted), "rejected": len(rejected)},
        "shards": shards,
        "samples": [
            {
                k: v[k]
                for k in ("id", "sources", "modalities", "hashes", "shard", "key", "align_score", "notes")
                if k in v
            }
            for v in accepted
        ],
    }
    _write_json(out / "manifest.json", manifest)
    with open(out / "rejected.jsonl.tmp", "w", encoding="utf-8") as f:
        for v in rejected:
            row = {"id": v["id"], "sources": v["sources"], "reasons": [r for r, _ in v["reasons"]]}
            row["details"] = [d for _, d in v["reasons"]]
            if v["notes"]:
                row["notes"] = v["notes"]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "rejected.jsonl.tmp").replace(out / "rejected.jsonl")
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


def _write_shards(
    accepted: list[dict], out: Path, work: Path, shard_size: int, chunk_size: int, progress: bool
) -> tuple[list[str], int]:
    """Copy accepted records from the chunk tars into out/shard-NNNNNN.tar, skipping shards already written
    with the same samples; stale shards from an earlier build are removed. Returns (names, shards written)."""
    from tqdm import tqdm

    state_path = work / "shards.json"
    state = _read_json(state_path) or {}
    plan = [accepted[s : s + shard_size] for s in range(0, len(accepted), shard_size)]
    names = [f"shard-{k:06d}.tar" for k in range(len(plan))]
    for old in out.glob("shard-*.tar"):
        if old.name not in names:
            old.unlink()
    cache: dict[int, dict[str, dict]] = {}
    written = 0
    for name, group in tqdm(list(zip(names, plan)), desc="write", unit="shard", disable=not progress):
        ids = [v["id"] for v in group]
        for v in group:
            v["shard"], v["key"] = name, _key(v["index"])
        path = out / name
        done = state.get(name)
        if done and done["ids"] == ids and path.is_file() and _file_sha256(path) == done["sha256"]:
            continue
        tmp = path.with_name(name + ".tmp")
        with wds.TarWriter(str(tmp), encoder=False, mtime=0) as writer:
            for v in group:
                chunk = v["index"] // chunk_size
                if chunk not in cache:
                    cache.clear()  # accepted samples come in input order: one chunk at a time
                    url = str(work / f"chunk-{chunk:06d}.tar")
                    cache[chunk] = {
                        r["__key__"]: {k: b for k, b in r.items() if not k.startswith("__") or k == "__key__"}
                        for r in shard_samples(url)
                    }
                writer.write(cache[chunk][v["key"]])
        tmp.replace(path)
        state[name] = {"ids": ids, "sha256": _file_sha256(path)}
        _write_json(state_path, state)
        written += 1
    return names, written


__all__ = [
    "BuildConfig",
    "BuildResult",
    "Member",
    "SampleSpec",
    "build",
    "build_id",
    "process_sample",
    "run_chunk",
    "scan",
    "source_kind",
]
