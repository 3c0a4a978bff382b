#!/usr/bin/env python
"""Latency of `POST /v1/generate` (caption, VQA, text -> image) of a unified model served by `mmfusion serve`.

Starts `mmfusion serve MODEL --threads T --timeout-s S` as a child process on a free loopback port
(serve_load.Server: a serve_load.Child, in its own process group, killed at the end) twice, with batching
(the server's defaults) and with `--no-batching`, and for each request kind sends `--sequential` requests one
after another (p50 and max latency), then `--concurrent` requests at once (wall time until the
last answer, and the model calls they took, from the server's `mmfusion_model_executions_total`). Inputs: test
scenes of SyntheticWorld(seed 0) at the model's image size as PNG; prompt "a large red circle"; request i
uses seed i. Every answer must be 200. Prints a Markdown table and, with --json, every timing.

The model folder is any `mmfusion train-unified` folder; the documented figures use the quality-benchmark
model (600 steps), which `make bench-generate-latency` creates first when it is missing:

    .venv/bin/python benchmarks/unified.py --part quality --save-model runs/unified_benchmark/model
    .venv/bin/python benchmarks/generate_latency.py --model runs/unified_benchmark/model
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

from serve_load import Server

ENCODER = {"caption": "caption", "vqa": "vqa", "image n=1": "image", "image n=4, cfg 2": "image"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model", type=Path, default=Path("runs/unified_benchmark/model"), help="unified model folder"
    )
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--sequential", type=int, default=10, help="requests sent one after another per kind")
    p.add_argument("--concurrent", type=int, default=16, help="requests sent at once per kind")
    p.add_argument(
        "--timeout-s",
        type=float,
        default=300,
        help="server --timeout-s: text -> image requests run one per model call, so 16 waiting ones can pass "
        "the server's default 10 s on a loaded machine and be answered 503",
    )
    p.add_argument("--json", type=Path, help="also write every timing here")
    return p.parse_args(argv)


def request_bodies(image_size: int):
    from PIL import Image

    from mmfusion.data.synthetic import SyntheticWorld, WorldConfig

    world = SyntheticWorld(WorldConfig(seed=0, image_size=image_size))

    def png(i: int) -> str:
        buf = io.BytesIO()
        Image.fromarray(world.sample("test", i)["image"]).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    prompt = "a large red circle"
    return {
        "caption": lambda i: {"task": "caption", "image": png(i)},
        "vqa": lambda i: {"task": "vqa", "image": png(i), "question": "how many objects are there?"},
        "image n=1": lambda i: {"task": "image", "prompt": prompt, "seed": i},
        "image n=4, cfg 2": lambda i: {"task": "image", "prompt": prompt, "n": 4, "cfg_scale": 2, "seed": i},
    }


async def measure(server: Server, bodies: dict, sequential: int, concurrent: int) -> dict:
    out = {}
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as c:
        for name, body in bodies.items():
            times = []
            for i in range(sequential):
                t = time.perf_counter()
                r = await c.post("/v1/generate", json=body(i))
                times.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"{name}: HTTP {r.status_code}: {r.text}")
            label = f'{{encoder="{ENCODER[name]}"}}'
            calls0 = server.metric("mmfusion_model_executions_total", label)
            t = time.perf_counter()
            rs = await asyncio.gather(
                *(c.post("/v1/generate", json=body(100 + i)) for i in range(concurrent))
            )
            wall = time.perf_counter() - t
            if any(r.status_code != 200 for r in rs):
                raise RuntimeError(f"{name}: statuses {sorted({r.status_code for r in rs})}")
            calls = server.metric("mmfusion_model_executions_total", label) - calls0
            out[name] = {"sequential_s": times, "concurrent_wall_s": wall, "concurrent_calls": int(calls)}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.model / "vocab.json").is_file():
        print(
            f"{args.model}: not a unified model folder (no vocab.json); make one with `.venv/bin/python "
            f"benchmarks/unified.py --part quality --save-model {args.model}` "
            "(`make bench-generate-latency` does that first when the folder is missing)",
            file=sys.stderr,
        )
        return 2
    image_size = json.loads((args.model / "image_tokenizer" / "config.json").read_text())["model"][
        "image_size"
    ]
    bodies = request_bodies(image_size)
    results = {}
    for mode, flags in (("batching", []), ("no batching", ["--no-batching"])):
        with Server(args.model, [*flags, "--timeout-s", str(args.timeout_s)], args.threads) as server:
            results[mode] = asyncio.run(measure(server, bodies, args.sequential, args.concurrent))
    n = args.concurrent
    print(
        f"model {args.model}, server {args.threads} thread(s); {args.sequential} sequential, then {n} at once"
    )
    print(
        f"\n| request | sequential p50 ms | max ms | {n} at once, wall ms (batching) | "
        f"{n} at once, wall ms (`--no-batching`) | `--no-batching` sequential p50 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in bodies:
        b, nb = results["batching"][name], results["no batching"][name]
        print(
            f"| {name} | {statistics.median(b['sequential_s']) * 1e3:.0f} | {max(b['sequential_s']) * 1e3:.0f} | "
            f"{b['concurrent_wall_s'] * 1e3:.0f} ({b['concurrent_calls']} calls) | "
            f"{nb['concurrent_wall_s'] * 1e3:.0f} ({nb['concurrent_calls']} calls) | "
            f"{statistics.median(nb['sequential_s']) * 1e3:.0f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2)
        )
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
