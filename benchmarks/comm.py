"""Bytes all-reduced per step and loss after N steps for DDP communication hooks, in one run.

Plain all-reduce (the `allreduce` Python hook, same traffic as DDP's built-in one), fp16 compression,
PowerSGD (rank from --compress-ratio, see mmfusion.train.comm) and local SGD (parameters averaged every
--period steps) train the same model from the same weights on the same per-rank data.

    .venv/bin/python benchmarks/comm.py --nproc 2 --steps 30
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmfusion.layers import Transformer
from mmfusion.train.comm import count_allreduce_bytes
from mmfusion.train.parallel import ParallelConfig, apply_parallelism, build_mesh, comm_handle, launch_local

HOOKS = ("allreduce", "fp16", "powersgd", "local_sgd")


class Model(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.body = Transformer(width, depth, max(1, width // 32))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.body(self.inp(x))).squeeze(-1).mean(-1)


def task(g: torch.Generator, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, tokens, 16, generator=g)
    return x, x[..., :4].sum(-1).mean(-1).tanh()  # a learnable target


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for hook in args.hooks:
        torch.manual_seed(0)
        cfg = ParallelConfig(
            comm={"hook": hook, "compress_ratio": args.compress_ratio, "local_sgd_period": args.period}
        )
        model = apply_parallelism(Model(args.width, args.depth), cfg, build_mesh(cfg))
        opt = comm_handle(model).wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=args.lr))
        g = torch.Generator().manual_seed(1000 + rank)
        total, losses = 0, []
        for _ in range(args.steps):
            x, y = task(g, args.batch, args.tokens)
            with count_allreduce_bytes() as counter:
                loss = F.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            total += counter.bytes
            t = loss.detach().clone()
            dist.all_reduce(t)
            losses.append(float(t) / world)
        last = sum(losses[-5:]) / len(losses[-5:])
        info = comm_handle(model).info
        rows.append({"hook": hook, "bytes_per_step": total / args.steps, "loss_last5": last, **info})
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes (gloo on CPU)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per hook")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="per-process batch")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--compress-ratio", type=float, default=0.3, help="PowerSGD target payload fraction")
    p.add_argument("--period", type=int, default=4, help="local SGD averaging period K")
    p.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=HOOKS)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_out:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        argv = [str(Path(__file__).resolve()), *sys.argv[1:], "--worker-out", str(out)]
        launch_local(argv, args.nproc, timeout_s=args.timeout)
        rows = json.loads(out.read_text())
    dense = next((r["bytes_per_step"] for r in rows if r["hook"] == "allreduce"), None)
    print(
        f"| hook | bytes all-reduced / step / rank | vs all-reduce | loss (mean of last 5 of {args.steps}) |"
    )
    print("|---|---:|---:|---:|")
    for r in rows:
        rel = f"{r['bytes_per_step'] / dense:.3f}" if dense else "-"
        extra = f" (rank {r['rank']})" if "rank" in r else f" (K={r['period']})" if "period" in r else ""
        print(f"| {r['hook']}{extra} | {r['bytes_per_step']:,.0f} | {rel} | {r['loss_last5']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
