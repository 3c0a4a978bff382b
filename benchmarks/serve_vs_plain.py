#!/usr/bin/env python
"""Text embeddings/s (issue 19 part 3): `mmfusion serve` (dynamic batching) vs a plain FastAPI endpoint that
calls the same model once per request vs ONNX Runtime in-process, on loopback, one machine.

    .venv/bin/python benchmarks/serve_vs_plain.py --concurrency 64 --duration 15

The model: --model, or serve_load.py's small random-weight contrastive model (text tower 64 wide, 2 blocks,
context 32), or with --width/--depth a wider random one. Every request embeds one distinct caption.

  mmfusion serve   `mmfusion serve MODEL --threads T --max-batch B --no-cache` (dynamic batching; the cache is
                   off because every caption is new anyway)
  plain FastAPI    this file's `--plain-app`: uvicorn, one worker, a sync `def` endpoint (FastAPI runs it in
                   its thread pool) that tokenizes the request's text and calls `model.embed_text_ids` on it,
                   torch threads T; the JSON answer has the same `embeddings` field
  HTTP load        --concurrency closed-loop clients (each sends its next request when the last is answered)
                   for --duration s per server; embeddings/s = 2xx answers / wall; p50/p99 latency. --client
                   raw (default): one minimal HTTP/1.1 keep-alive connection each (serve_load.RawConnection,
                   ~0.1 ms CPU per request); --client httpx: a shared httpx.AsyncClient, which costs ~9.5 ms
                   CPU per request with 64 connections and so, on 2 cores, caps both servers near 60/s.
                   Each round prints the CPU per answered request of the server (all its threads) and of
                   the load generator.
  ONNX in-process  the text tower exported by `mmfusion.serve.export.export_onnx` in an onnxruntime session
                   (intra-op threads T): one caption per `session.run` (batch 1), and --max-batch captions per
                   run (batched); tokenization included; p50/p99 of one run (what a request would wait for a
                   batch already formed, queueing not included)
  CPU column       per embedding: the server process's CPU time (every thread) over its 2xx answers for the
                   HTTP rows (median over rounds), the benchmark process's CPU time for ONNX; less sensitive to
                   the other jobs on the machine than embeddings/s, so its plain / serve ratio is printed too

Servers run as serve_load.Child processes, each in its own process group (killed at the end, SIGKILL after
10 s). The two servers alternate --rounds times (server A, server B, A, B, ...) so both see the same machine
load; figures are medians over rounds, the ratio the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import Child, closed_loop, small_model  # noqa: E402  (a sibling script, not a package)

HERE = Path(__file__).resolve()


def plain_app(model_dir: str, port: int, threads: int) -> None:
    """The plain baseline: FastAPI + uvicorn, one model call per request, no batching, no queue."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from mmfusion import load_model

    torch.set_num_threads(threads)
    model = load_model(model_dir).eval()
    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/v1/embed")
    def embed(body: dict):
        texts = body["text"]
        with torch.inference_mode():
            emb = model.embed_text_ids(model.tokenizer.encode(list(texts)))
        return {"modality": "text", "dim": emb.shape[1], "embeddings": emb.float().numpy().tolist()}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", workers=1)


def wide_model(folder: Path, width: int, depth: int) -> Path:
    """A random-weight contrastive model with a text tower `width` wide and `depth` blocks (context 32)."""
    import torch

    from mmfusion.config import ModelConfig
    from mmfusion.data.synthetic import SyntheticWorld, make_split
    from mmfusion.modalities.text import TextTokenizer
    from mmfusion.models.contrastive import ContrastiveModel

    captions = [s["text"] for s in make_split(SyntheticWorld(), "train", 200, ("text",))]
    tok = TextTokenizer.train(captions, vocab_size=256, context_length=32)
    heads = max(1, width // 64)
    cfg = ModelConfig.model_validate(
        {
            "embed_dim": 64,
            "text": {"width": width, "depth": depth, "heads": heads, "context_length": 32},
            "image": {"image_size": 32, "patch_size": 8, "width": 64, "depth": 1, "heads": 1},
        }
    )
    torch.manual_seed(0)
    return ContrastiveModel(cfg, tok).save_pretrained(folder)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_round(child_cmd: list[str], threads: int, concurrency: int, duration: float, raw: bool) -> dict:
    def load(seconds: float):
        return asyncio.run(closed_loop(s.url, concurrency, seconds, raw=raw, max_requests=10**7))

    with Child(child_cmd, threads) as s:
        load(1.0)  # warm-up: first calls, connections
        server0, client0 = cpu_seconds(s.proc.pid), time.process_time()
        tally, wall = load(duration)
        server_cpu, client_cpu = cpu_seconds(s.proc.pid) - server0, time.process_time() - client0
        batch = s.mean_batch()
    ok = sum(n for c, n in tally.codes.items() if 200 <= c < 300)
    p50, p99 = np.percentile(tally.lat, [50, 99]) * 1000 if tally.lat else (float("nan"),) * 2
    return {
        "per_s": ok / wall,
        "p50_ms": p50,
        "p99_ms": p99,
        "ok": ok,
        "sent": tally.sent,
        "lost": tally.lost,
        "mean_batch": batch,
        "server_cpu_us": server_cpu / max(ok, 1) * 1e6,  # per 2xx answer, every thread of the server
        "client_cpu_us": client_cpu / max(ok, 1) * 1e6,  # the load generator's, per 2xx answer
    }


def onnx_rows(model_dir: Path, threads: int, max_batch: int, n: int) -> list[dict]:
    from mmfusion import load_model
    from mmfusion.serve.export import INPUT_NAMES, export_onnx, onnx_session

    model = load_model(model_dir).eval()
    tmp = tempfile.TemporaryDirectory()
    path = export_onnx(model, tmp.name)["text"]
    session = onnx_session(path, threads)
    texts = [f"a large blue square number {i}" for i in range(n)]
    rows = []
    for name, size in (
        ("ONNX Runtime in-process, batch 1", 1),
        (f"ONNX Runtime in-process, batch {max_batch}", max_batch),
    ):

        def run(batch):
            ids = model.tokenizer.encode(batch).numpy()
            return session.run(None, {INPUT_NAMES["text"]: ids})[0]

        run(texts[:size])
        lat, t0, cpu0 = [], time.perf_counter(), time.process_time()
        for i in range(0, n, size):
            t = time.perf_counter()
            run(texts[i : i + size])
            lat.append(time.perf_counter() - t)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        p50, p99 = np.percentile(lat, [50, 99]) * 1000
        rows.append({"what": name, "per_s": n / wall, "p50_ms": p50, "p99_ms": p99, "cpu_us": cpu / n * 1e6})
    tmp.cleanup()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: a small random-weight contrastive model)")
    ap.add_argument("--width", type=int, help="build a random model with a text tower this wide instead")
    ap.add_argument("--depth", type=int, default=4, help="its blocks (with --width)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load per server per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch / onnxruntime intra-op threads")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--onnx-requests", type=int, default=2048)
    ap.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: raw HTTP/1.1 connections (~0.1 ms CPU per request) or httpx.AsyncClient (~9 ms)",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plain-app", metavar="MODEL", help=argparse.SUPPRESS)  # the child: run the plain server
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_app:
        plain_app(args.plain_app, args.port, args.threads)
        return 0
    # SIGTERM (e.g. a timeout) unwinds through the `with Child` blocks, which kill the server groups
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not 0 < args.duration <= 60:
        ap.error("--duration must be in (0, 60]")
    tmp = tempfile.TemporaryDirectory()
    if args.model:
        model = Path(args.model)
    elif args.width:
        model = wide_model(Path(tmp.name) / "model", args.width, args.depth)
    else:
        model = small_model(Path(tmp.name) / "model")
    t = str(args.threads)
    cmds = {
        "mmfusion serve (batching)": [
            sys.executable, "-m", "mmfusion.cli", "serve", str(model), "--threads", t,
            "--max-batch", str(args.max_batch), "--no-cache", "--queue-size", str(4 * args.concurrency),
        ],
        "plain FastAPI (per request)": [sys.executable, str(HERE), "--plain-app", str(model), "--threads", t],
    }  # fmt: skip
    load0 = os.getloadavg()
    runs: dict[str, list[dict]] = {k: [] for k in cmds}
    for r in range(args.rounds):
        for name, cmd in cmds.items():
            res = http_round(cmd, args.threads, args.concurrency, args.duration, args.client == "raw")
            runs[name].append(res)
            print(
                f"round {r + 1} {name}: {res['per_s']:.0f} embeddings/s, p50 {res['p50_ms']:.1f} ms, "
                f"p99 {res['p99_ms']:.1f} ms ({res['ok']}/{res['sent']} 2xx, {res['lost']} lost, mean batch "
                f"{res['mean_batch']:.1f}; CPU per request: server {res['server_cpu_us']:.0f} us, client "
                f"{res['client_cpu_us']:.0f} us; load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    onnx = onnx_rows(model, args.threads, args.max_batch, args.onnx_requests)
    load1 = os.getloadavg()
    names = list(cmds)
    ratio = statistics.median(
        a["per_s"] / b["per_s"] for a, b in zip(runs[names[0]], runs[names[1]], strict=True)
    )
    rows = [
        {"what": f"{name}, {args.concurrency} clients"}
        | {k: statistics.median(x[k] for x in runs[name]) for k in ("per_s", "p50_ms", "p99_ms")}
        | {"cpu_us": statistics.median(x["server_cpu_us"] for x in runs[name])}
        for name in names
    ] + onnx
    print(f"\nload average {load0[0]:.1f} before, {load1[0]:.1f} after; {args.threads} thread(s) per server")
    print("| what | embeddings/s | p50 ms | p99 ms | CPU us per embedding |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['what']} | {row['per_s']:.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
            f"{row['cpu_us']:.0f} |"
        )
    print(f"\nmmfusion serve / plain FastAPI: {ratio:.2f}x (median of per-round ratios)")
    cpu_ratio = rows[1]["cpu_us"] / rows[0]["cpu_us"]
    print(f"server CPU per embedding, plain FastAPI / mmfusion serve: {cpu_ratio:.2f}x")
    base = rows[1]["per_s"]
    for row in onnx:
        print(f"{row['what']} / plain FastAPI: {row['per_s'] / base:.2f}x")
    if args.json:
        args.json.write_text(
            json.dumps({"settings": vars(args) | {"model": str(model)}, "rounds": runs, "rows": rows,
                        "ratio_serve_vs_plain": ratio, "cpu_ratio_plain_vs_serve": cpu_ratio,
                        "load": [load0, load1]}, indent=2, default=str)
        )  # fmt: skip
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
