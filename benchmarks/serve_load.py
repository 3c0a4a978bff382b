"""Load test for `mmfusion serve` on loopback (bounded in request count and time).

    .venv/bin/python benchmarks/serve_load.py --rate 100 --duration 10 --concurrency 200

Starts the server as a child process (127.0.0.1, a free port, its own process group: `Child`) once per
scenario, drives it with an httpx async client (the closed-loop scenarios with `--client raw`: one
RawConnection per client, ~0.1 ms CPU per request instead of httpx's ~9.5 ms), and prints a Markdown table:

  open loop    requests sent at a fixed rate (not waiting for answers): lost, 5xx, p50/p99 (httpx)
  closed loop  C connections each sending back to back against a small queue: every answer must be 2xx, or
               503/429 with Retry-After
  batching     closed loop with batching on vs --no-batching (throughput, mean batch size)
  cache        a repeating set of captions with the cache on vs --no-cache (throughput, hit rate)
  in-process   N simultaneous submits to the real model's text batcher -> model executions (no HTTP)
  split        per-request latency of /v1/classify (one image + one question, one connection, sequential) on
               a small multimodal model: `mmfusion serve` in one process vs `--split` (front/cache, encoder
               service, fusion service), with the image new / cached / both inputs cached

Without --model a small random-weight contrastive model is built and saved to a temporary folder (the
numbers measure serving overhead, not model quality).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np

MAX_DURATION_S = 60.0
MAX_REQUESTS = 20_000


def small_model(folder: Path) -> Path:
    import torch

    from mmfusion.config import ModelConfig
    from mmfusion.data.synthetic import SyntheticWorld, make_split
    from mmfusion.modalities.text import TextTokenizer
    from mmfusion.models.contrastive import ContrastiveModel

    captions = [s["text"] for s in make_split(SyntheticWorld(), "train", 200, ("text",))]
    tok = TextTokenizer.train(captions, vocab_size=256, context_length=32)
    cfg = ModelConfig.model_validate(
        {
            "embed_dim": 64,
            "text": {"width": 64, "depth": 2, "heads": 4, "context_length": 32},
            "image": {"image_size": 32, "patch_size": 8, "width": 64, "depth": 2, "heads": 4},
        }
    )
    torch.manual_seed(0)
    return ContrastiveModel(cfg, tok).save_pretrained(folder)


def small_multimodal_model(folder: Path) -> Path:
    """Text + image encoders (64 wide, 2 blocks), cross-attention fusion, 3 classes; random weights."""
    import torch

    from mmfusion.data.synthetic import SyntheticWorld, make_split
    from mmfusion.modalities.text import TextTokenizer
    from mmfusion.models.multimodal import MultiModalModel

    captions = [s["text"] for s in make_split(SyntheticWorld(), "train", 200, ("text",))]
    tok = TextTokenizer.train(captions, vocab_size=256, context_length=32)
    torch.manual_seed(0)
    encoders = {
        "text": {"width": 64, "depth": 2, "heads": 4},
        "image": {"image_size": 32, "patch_size": 8, "width": 64, "depth": 2, "heads": 4},
    }
    model = MultiModalModel(encoders, fusion="cross_attention", n_classes=3, dim=64, tokenizer=tok)
    return model.save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A server child process (`cmd --port PORT`) in its own process group; `with` waits for /healthz, and
    on leaving kills the whole group (SIGTERM, then SIGKILL after 10 s), children of the server included.

    serve_vs_plain.py and generate_latency.py use it too: the one way these benchmarks run servers."""

    def __init__(self, cmd: list[str], threads: int, start_timeout_s: float = 90.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
        cmd = [*cmd, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, start_new_session=True)

    def __enter__(self) -> Child:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"server did not start in {self.start_timeout_s:g} s")

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def metric(self, name: str, labels: str = "") -> float:
        """One value from the server's /metrics; NaN when absent (or the server has no /metrics)."""
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=5).text
        except httpx.HTTPError:
            return float("nan")
        m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else float("nan")

    def mean_batch(self, encoder: str = "text") -> float:
        """Mean items per model call of one encoder's batcher (warm-up included); NaN without /metrics."""
        label = f'{{encoder="{encoder}"}}'
        count = self.metric("mmfusion_batch_size_count", label)
        return self.metric("mmfusion_batch_size_sum", label) / count if count else float("nan")


class Server(Child):
    """`mmfusion serve MODEL --threads T FLAGS` as a Child."""

    def __init__(self, model: Path | str, flags: list[str], threads: int):
        cmd = [sys.executable, "-m", "mmfusion.cli", "serve", str(model), "--threads", str(threads), *flags]
        super().__init__(cmd, threads)


class Tally:
    def __init__(self):
        self.lat: list[float] = []
        self.codes: dict[int, int] = {}
        self.lost = 0  # no HTTP answer at all (connection error / client timeout)
        self.bad_overload = 0  # 503/429 without Retry-After
        self.sent = 0

    def add(self, r: httpx.Response | RawResponse | None, seconds: float) -> None:
        if r is None:
            self.lost += 1
            return
        self.codes[r.status_code] = self.codes.get(r.status_code, 0) + 1
        if r.status_code in (429, 503) and "retry-after" not in r.headers:
            self.bad_overload += 1
        if 200 <= r.status_code < 300:
            self.lat.append(seconds)

    def row(self, name: str, wall: float, extra: str = "") -> str:
        ok = sum(n for c, n in self.codes.items() if 200 <= c < 300)
        over = self.codes.get(503, 0) + self.codes.get(429, 0)
        fivexx = sum(n for c, n in self.codes.items() if c >= 500 and c != 503)
        other = self.sent - ok - over - fivexx - self.lost
        p50, p99 = (np.percentile(self.lat, [50, 99]) * 1000) if self.lat else (math.nan, math.nan)
        return (
            f"| {name} | {self.sent} | {ok} | {over} | {fivexx} | {other} | {self.lost} | {self.bad_overload} | "
            f"{ok / wall:.0f} | {p50:.1f} | {p99:.1f} | {extra} |"
        )


async def one(client: httpx.AsyncClient, tally: Tally, payload: dict) -> None:
    tally.sent += 1
    t = time.perf_counter()
    try:
        r = await client.post("/v1/embed", json=payload)
    except httpx.HTTPError:
        r = None
    tally.add(r, time.perf_counter() - t)


def client_for(url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=30)


async def open_loop(url: str, rate: float, duration: float) -> tuple[Tally, float]:
    tally, n = Tally(), min(int(rate * duration), MAX_REQUESTS)
    async with client_for(url, 512) as c:
        start, tasks = time.perf_counter(), []
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(c, tally, {"text": [f"a small red circle number {i}"]})))
        await asyncio.gather(*tasks)
    return tally, time.perf_counter() - start


class RawResponse(NamedTuple):
    status_code: int
    headers: dict[str, str]  # lower-case names


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client on one asyncio connection: POST a JSON body, read the status line,
    the headers and a Content-Length body (what uvicorn sends; chunked bodies are refused).

    The load generator of serve_vs_plain.py: it costs ~0.1 ms of CPU per request, where httpx.AsyncClient
    with 64 pooled connections took ~9.5 ms (measured in the same closed loop), so on 2 cores httpx, not the
    server, set the pace (both servers got ~60 requests/s and batches of 2)."""

    def __init__(self, url: str):
        self.host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, payload: dict) -> RawResponse:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        body = json.dumps(payload).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        try:
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = dict(
                (k.strip().lower(), v.strip()) for k, v in (h.split(":", 1) for h in head[1:] if h)
            )
            if "content-length" not in headers:
                raise ConnectionError(f"answer without Content-Length: {head[0]!r}")
            await self.reader.readexactly(int(headers["content-length"]))
        except BaseException:
            self.close()  # the connection's state is unknown: the next request opens a new one
            raise
        return RawResponse(int(head[0].split(" ", 2)[1]), headers)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def closed_loop(
    url: str,
    concurrency: int,
    duration: float,
    texts=None,
    raw: bool = False,
    max_requests: int = MAX_REQUESTS,
) -> tuple[Tally, float]:
    """`concurrency` clients, each sending its next /v1/embed (one caption) when the last is answered, for
    `duration` s or `max_requests` requests. raw: each client is a RawConnection (cheap) instead of sharing an
    httpx.AsyncClient pool."""
    tally, stop = Tally(), time.perf_counter() + duration
    counter = iter(range(10**9))

    def payload() -> dict:
        i = next(counter)
        return {"text": [texts[i % len(texts)] if texts else f"a large blue square number {i}"]}

    async def worker(c):
        while time.perf_counter() < stop and tally.sent < max_requests:
            await one(c, tally, payload())

    async def raw_worker():
        conn = RawConnection(url)
        try:
            while time.perf_counter() < stop and tally.sent < max_requests:
                tally.sent += 1
                t = time.perf_counter()
                try:
                    r = await asyncio.wait_for(conn.post("/v1/embed", payload()), 30)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                    r = None
                tally.add(r, time.perf_counter() - t)
        finally:
            conn.close()

    start = time.perf_counter()
    if raw:
        await asyncio.gather(*(raw_worker() for _ in range(concurrency)))
    else:
        async with client_for(url, concurrency) as c:
            await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    return tally, time.perf_counter() - start


def in_process(model: Path, n: int, max_batch: int) -> str:
    from mmfusion import load_model
    from mmfusion.serve.batching import DynamicBatcher
    from mmfusion.serve.engine import Engine

    engine = Engine(load_model(model))

    async def main():
        b = DynamicBatcher(lambda items: engine.embed("text", items), max_batch, 5.0, max(n, 1), 60.0)
        t = time.perf_counter()
        await asyncio.gather(*(b.submit(f"caption {i}") for i in range(n)))
        wall = time.perf_counter() - t
        await b.close()
        return b.executions, wall

    executions, wall = asyncio.run(main())
    return (
        f"in-process batcher, real model: {n} simultaneous requests, max_batch {max_batch} -> "
        f"{executions} model executions (ceil = {math.ceil(n / max_batch)}), {wall * 1000:.0f} ms"
    )


def _png_b64(seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def split_overhead(n: int, threads: int, max_delay_ms: float) -> list[dict]:
    """Sequential /v1/classify latency, in one process vs --split, for three cache situations."""
    tmp = tempfile.TemporaryDirectory()
    model = small_multimodal_model(Path(tmp.name) / "mm")
    images = [_png_b64(i) for i in range(n)]
    cases = {  # name -> the i-th request's one sample
        "new image, new question": lambda i: {"image": images[i], "text": f"what is shape number {i}"},
        "cached image, new question": lambda i: {"image": images[0], "text": f"what colour is item {i}"},
        "cached image, same question": lambda i: {"image": images[0], "text": "what colour is it"},
    }
    out = []
    delay = ["--max-delay-ms", str(max_delay_ms)]
    for deployment, flags in (("one process", delay), ("split", [*delay, "--split"])):
        with Server(model, flags, threads) as s, httpx.Client(base_url=s.url, timeout=30) as c:
            for case, sample in cases.items():
                lat, status = [], set()
                for i in range(n):
                    t = time.perf_counter()
                    r = c.post("/v1/classify", json={"inputs": [sample(i)]})
                    lat.append(time.perf_counter() - t)
                    status.add(r.status_code)
                p50, p99 = np.percentile(lat, [50, 99]) * 1000
                out.append(
                    {"deployment": deployment, "case": case, "n": n, "p50_ms": p50, "p99_ms": p99,
                     "status": sorted(status)}
                )  # fmt: skip
            if deployment == "split":
                shapes = c.get("/healthz").json()  # the front's; token shapes are on the fusion service
                fusion = httpx.get(f"{shapes['services']['fusion']}/healthz").json()["token_shapes"]
                per_sample = sum(4 * n_tok * dim + 1 for n_tok, dim in fusion.values())
                for row in out[-len(cases) :]:
                    row["tokens_bytes_per_sample"] = per_sample
    tmp.cleanup()
    return out


def split_table(rows: list[dict]) -> str:
    base = {r["case"]: r["p50_ms"] for r in rows if r["deployment"] == "one process"}
    lines = [
        "| deployment | case | requests | p50 ms | p99 ms | p50 overhead vs one process | statuses |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        over = r["p50_ms"] - base[r["case"]]
        lines.append(
            f"| {r['deployment']} | {r['case']} | {r['n']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{over:+.1f} ms | {r['status']} |"
        )
    return "\n".join(lines)


def plot_split(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, dep in enumerate(("one process", "split")):
        vals = [next(r["p50_ms"] for r in rows if r["deployment"] == dep and r["case"] == c) for c in cases]
        ax.bar(np.arange(len(cases)) + (k - 0.5) * 0.38, vals, 0.38, label=dep)
    ax.set_xticks(range(len(cases)), cases, fontsize=8)
    ax.set_ylabel("p50 latency per /v1/classify (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: a small random-weight contrastive model)")
    ap.add_argument("--rate", type=float, default=100.0, help="open-loop requests per second")
    ap.add_argument(
        "--duration", type=float, default=10.0, help=f"seconds per scenario (<= {MAX_DURATION_S:g})"
    )
    ap.add_argument("--concurrency", type=int, default=200, help="closed-loop connections")
    ap.add_argument("--queue-size", type=int, default=64, help="server queue for the closed-loop scenario")
    ap.add_argument("--compare-concurrency", type=int, default=32, help="connections for on/off comparisons")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument(
        "--max-delay-ms",
        type=float,
        default=5.0,
        help="batching delay in the split scenario (server default 5)",
    )
    ap.add_argument(
        "--scenarios", default="open,closed,batching,cache,inprocess,split", help="comma-separated subset"
    )
    ap.add_argument("--split-requests", type=int, default=100, help="requests per case in the split scenario")
    ap.add_argument(
        "--client",
        choices=("httpx", "raw"),
        default="httpx",
        help="closed-loop load generator: httpx.AsyncClient (~9.5 ms CPU per request with 64 connections: on "
        "2 cores it, not the server, sets the pace) or RawConnection (~0.1 ms)",
    )
    ap.add_argument("--json", type=Path, help="write every result here as JSON")
    ap.add_argument("--plot", type=Path, help="write the split scenario's latency bars here (PNG)")
    args = ap.parse_args()
    if not 0 < args.duration <= MAX_DURATION_S:
        ap.error(f"--duration must be in (0, {MAX_DURATION_S:g}]")
    which = set(args.scenarios.split(","))
    raw = args.client == "raw"
    # SIGTERM (e.g. a timeout) unwinds through the `with Server` blocks, which kill the server groups
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else small_model(Path(tmp.name) / "model")
    mb = ["--max-batch", str(args.max_batch)]
    rows: list[str] = []
    results: dict = {}
    header = (
        "| scenario | sent | 2xx | 503/429 | other 5xx | other | lost | 503 w/o Retry-After | 2xx/s | p50 ms | "
        "p99 ms | notes |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    if "open" in which:
        with Server(model, mb, args.threads) as s:
            t, wall = asyncio.run(open_loop(s.url, args.rate, args.duration))
            rows.append(t.row(f"open loop {args.rate:g} req/s", wall, f"{wall:.1f} s"))
    if "closed" in which:
        with Server(model, [*mb, "--queue-size", str(args.queue_size)], args.threads) as s:
            t, wall = asyncio.run(closed_loop(s.url, args.concurrency, args.duration, raw=raw))
            rows.append(t.row(f"closed loop {args.concurrency} conns, queue {args.queue_size}", wall))
    if "batching" in which:
        for name, flags in (("batching on", mb), ("batching off", ["--no-batching"])):
            with Server(model, [*flags, "--no-cache"], args.threads) as s:
                t, wall = asyncio.run(closed_loop(s.url, args.compare_concurrency, args.duration, raw=raw))
                note = f"mean batch {s.mean_batch():.1f}"
                rows.append(t.row(f"{name}, {args.compare_concurrency} conns", wall, note))
    if "cache" in which:
        texts = [f"a small green triangle number {i}" for i in range(50)]
        for name, flags in (("cache on", []), ("cache off", ["--no-cache"])):
            with Server(model, [*mb, *flags], args.threads) as s:
                t, wall = asyncio.run(closed_loop(s.url, args.compare_concurrency, args.duration, texts, raw))
                rate = s.metric("mmfusion_cache_hit_rate")
                note = f"hit rate {rate:.3f}" if not math.isnan(rate) else "cache disabled"
                rows.append(t.row(f"{name}, 50 distinct captions", wall, note))
    if rows:
        print(header)
        print("\n".join(rows))
        results["load"] = rows
    if "inprocess" in which:
        results["in_process"] = in_process(model, 100, args.max_batch)
        print()
        print(results["in_process"])
    if "split" in which:
        split = split_overhead(min(args.split_requests, MAX_REQUESTS), args.threads, args.max_delay_ms)
        results["split"] = split
        print()
        print(split_table(split))
        if args.plot:
            plot_split(split, args.plot)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
