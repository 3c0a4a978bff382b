"""Training samples/s of one process against N processes for DDP, FSDP2 and tensor parallel.

DDP and FSDP2 each process its own --batch (global batch = N * batch); tensor parallel splits the model,
so every process sees the same --batch (global batch = batch). The 1-process row is the plain model.

CPU (gloo, this machine):   .venv/bin/python benchmarks/scaling.py --nproc 2 --steps 10
GPUs (NCCL, one node):      python benchmarks/scaling.py --device cuda --nproc 8 --width 1024 --depth 12
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmfusion.layers import Transformer
from mmfusion.train.parallel import ParallelConfig, apply_parallelism, build_mesh, launch_local

MODES = ("ddp", "fsdp", "tp")


class Model(nn.Module):
    def __init__(self, width: int, depth: int, heads: int):
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.body = Transformer(width, depth, heads)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.body(self.inp(x))).squeeze(-1).mean(-1)


def config(mode: str, nproc: int) -> ParallelConfig:
    if mode == "fsdp":
        return ParallelConfig(fsdp={"enabled": True})
    if mode == "tp":
        return ParallelConfig(tensor={"size": nproc}, data=False)
    return ParallelConfig()


def worker(args: argparse.Namespace) -> None:
    import os

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = config(args.mode, world)
    mesh = build_mesh(cfg, device_type=device.type)
    torch.manual_seed(0)
    model = apply_parallelism(Model(args.width, args.depth, args.heads).to(device), cfg, mesh, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, args.tokens, 16, device=device)
    y = torch.randn(args.batch, device=device)

    def step():
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    global_batch = args.batch * (world if args.mode in ("ddp", "fsdp") else 1)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.worker_out).write_text(json.dumps({"samples_per_s": global_batch * args.steps / seconds}))
    if mesh is not None:
        torch.distributed.destroy_process_group()


def run(args: argparse.Namespace, mode: str, nproc: int, tmp: Path) -> float:
    out = tmp / f"{mode}-{nproc}.json"
    argv = [str(Path(__file__).resolve()), *sys.argv[1:], "--mode", mode, "--worker-out", str(out)]
    launch_local(argv, nproc, timeout_s=args.timeout, env={"OMP_NUM_THREADS": str(args.threads)})
    return json.loads(out.read_text())["samples_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes to compare with one")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=16, help="per-process batch (DDP/FSDP); TP: global")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_out:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one = run(args, "ddp", 1, Path(tmp))  # one process: no process group, the plain model
        for mode in args.modes:
            many = run(args, mode, args.nproc, Path(tmp))
            rows.append({"mode": mode, "one": one, "many": many, "speedup": many / one})
    print(f"| mode | 1 process samples/s | {args.nproc} processes samples/s | speed-up |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['one']:.1f} | {r['many']:.1f} | {r['speedup']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
