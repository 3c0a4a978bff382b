"""S1: FSDP2, DDP, tensor and pipeline parallel on CPU (gloo, 2 processes) against one process.

Each multi-process check is one `launch_local` run of this file as a script (`python test_parallel.py
<worker> <out>`), bounded by a pytest timeout, a launch timeout and a 60 s process-group timeout.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from mmfusion.layers import Transformer
from mmfusion.train.parallel import (
    ParallelConfig,
    apply_parallelism,
    build_mesh,
    launch_local,
    mesh_shape,
    stage_ranges,
)

HERE = Path(__file__)
STEPS = 20
LOSS_TOL = 1e-5  # relative: DDP / FSDP2 sum the same gradients in a different order
TP_TOL = 1e-5  # absolute, on O(1) outputs and gradients


class Toy(nn.Module):
    def __init__(self, width: int = 32, depth: int = 2, heads: int = 4):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.body = Transformer(width, depth, heads)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.inp(x), is_causal=True)).squeeze(-1).mean(-1)


def toy_data(steps: int, batch: int = 8, tokens: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(steps, batch, tokens, 8, generator=g), torch.randn(steps, batch, generator=g)


def train_curve(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, reduce=None) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for x, y in zip(xs, ys, strict=True):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(reduce(loss.detach()) if reduce else float(loss))
    return losses


# ------------------------------------------------------------------------------------------ workers


def _init() -> tuple[int, int]:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    return dist.get_rank(), dist.get_world_size()


def _mean(t: torch.Tensor) -> float:
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def worker_dp(out: Path) -> None:
    """One process (reference, computed locally), DDP and FSDP2 on the same global batch of 8."""
    import torch.distributed as dist

    rank, world = _init()
    torch.manual_seed(0)
    ref = Toy()
    xs, ys = toy_data(STEPS)
    local = slice(rank * 8 // world, (rank + 1) * 8 // world)
    result = {"one": train_curve(copy.deepcopy(ref), xs, ys)}
    for name, cfg in (
        ("ddp", ParallelConfig()),
        ("fsdp", ParallelConfig(fsdp={"enabled": True})),
        ("fsdp_noreshard", ParallelConfig(fsdp={"enabled": True, "reshard_after_forward": False})),
    ):
        mesh = build_mesh(cfg)
        model = apply_parallelism(copy.deepcopy(ref), cfg, mesh)
        result[name] = train_curve(model, xs[:, local], ys[:, local], reduce=_mean)
    if rank == 0:
        out.write_text(json.dumps(result))
    dist.destroy_process_group()


def worker_tp(out: Path) -> None:
    """Tensor parallel (with and without sequence parallel) vs the unsharded stack; then pipelines."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from mmfusion.train.parallel import apply_tensor_parallel, build_pipeline

    rank, world = _init()
    result: dict[str, float] = {}
    torch.manual_seed(0)
    ref = Transformer(32, 2, 4)
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    y_ref = ref(x, is_causal=True)
    (y_ref * w).sum().backward()
    for sp in (False, True):
        mesh = build_mesh(ParallelConfig(tensor={"size": 2, "sequence_parallel": sp}))
        tp = apply_tensor_parallel(copy.deepcopy(ref), mesh["tp"], sequence_parallel=sp)
        for p in tp.parameters():
            p.grad = None
        y = tp(x, is_causal=True)
        (y * w).sum().backward()
        diffs = [float((y - y_ref).abs().max())]
        for (name, p), (_, q) in zip(tp.named_parameters(), ref.named_parameters(), strict=True):
            full = p.full_tensor() if isinstance(p, DTensor) else p
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            assert torch.equal(full, q), name
            diffs.append(float((grad - q.grad).abs().max()))
        result[f"tp_sp{int(sp)}"] = max(diffs)
        assert isinstance(tp.blocks[0].attn.qkv.weight, DTensor)
        assert tp.blocks[0].attn.qkv.weight.to_local().shape == (48, 32)

    # pipeline: a 4-block stack split into stages over 2 ranks, 4 microbatches of 2
    torch.manual_seed(0)
    stack = Transformer(32, 4, 4)
    x, target = torch.randn(8, 6, 32, generator=g), torch.randn(8, 6, 32, generator=g)
    stack.zero_grad()
    loss_ref = F.mse_loss(stack(x), target)
    loss_ref.backward()
    for schedule, per_rank in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)):
        cfg = ParallelConfig(
            pipeline={"size": 2, "schedule": schedule, "microbatches": 4, "stages_per_rank": per_rank}
        )
        mesh = build_mesh(cfg)
        pipe = build_pipeline(stack, cfg.pipeline, mesh["pp"], F.mse_loss)
        losses: list[torch.Tensor] = []
        if pipe.has_first:
            pipe.schedule.step(x)
        else:
            pipe.schedule.step(target=target, losses=losses)
        diffs = []
        ranges = stage_ranges(4, pipe.n_stages)
        for module, idx in zip(pipe.modules, pipe.stage_indices, strict=True):
            for block, j in zip(module.blocks, range(*ranges[idx]), strict=True):
                for p, q in zip(block.parameters(), stack.blocks[j].parameters(), strict=True):
                    diffs.append(float((p.grad - q.grad).abs().max()))
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        loss_t = torch.tensor([float(loss), float(bool(losses))])
        dist.all_reduce(loss_t)
        diffs_t = torch.tensor([max(diffs)])
        dist.all_reduce(diffs_t, op=dist.ReduceOp.MAX)
        result[f"pp_{schedule}_loss"] = abs(float(loss_t[0]) - float(loss_ref))
        result[f"pp_{schedule}_grad"] = float(diffs_t)
        assert float(loss_t[1]) == 1.0  # exactly one rank holds the last stage
    if rank == 0:
        out.write_text(json.dumps(result))
    dist.destroy_process_group()


def worker_2d(out: Path) -> None:
    """FSDP2 over "dp" x TP over "tp" on a (1, 2, 2) mesh (4 processes) vs one process, 3 steps."""
    import torch.distributed as dist

    rank, _ = _init()
    cfg = ParallelConfig(fsdp={"enabled": True}, tensor={"size": 2})
    mesh = build_mesh(cfg)
    torch.manual_seed(0)
    ref = Toy()
    xs, ys = toy_data(3)
    dp = mesh["dp"].get_local_rank()
    model = apply_parallelism(copy.deepcopy(ref), cfg, mesh)
    result = {
        "one": train_curve(ref, xs, ys),
        "2d": train_curve(model, xs[:, dp * 4 : dp * 4 + 4], ys[:, dp * 4 : dp * 4 + 4], reduce=_mean),
    }
    if rank == 0:
        out.write_text(json.dumps(result))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- tests


def test_config_and_mesh_shape():
    assert ParallelConfig().data and not ParallelConfig().fsdp.enabled
    with pytest.raises(ValidationError):
        ParallelConfig(fsdp={"enabled": True, "shard": 2})
    with pytest.raises(ValidationError):
        ParallelConfig(pipeline={"schedule": "interleaved_1f1b"})  # needs stages_per_rank >= 2
    assert mesh_shape(ParallelConfig(tensor={"size": 2}), 4) == (1, 2, 2)
    assert mesh_shape(ParallelConfig(pipeline={"size": 2}), 2) == (2, 1, 1)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_shape(ParallelConfig(tensor={"size": 2}), 3)
    assert stage_ranges(5, 2) == [(0, 3), (3, 5)]
    assert build_mesh(ParallelConfig()) is None  # one process: nothing to build
    model = Toy()
    assert apply_parallelism(model, ParallelConfig(), None) is model


def test_cpu_offload_is_refused_on_cpu():
    cfg = ParallelConfig(fsdp={"enabled": True, "cpu_offload": True})
    with pytest.raises(ValueError, match="needs an accelerator"):
        apply_parallelism(Toy(), cfg, None, device="cpu")


@pytest.mark.timeout(150)
def test_ddp_and_fsdp2_match_one_process(tmp_path):
    out = tmp_path / "dp.json"
    launch_local([str(HERE), "dp", str(out)], 2, timeout_s=120)
    r = json.loads(out.read_text())
    assert len(r["one"]) == STEPS and r["one"][-1] < r["one"][0]
    for name in ("ddp", "fsdp", "fsdp_noreshard"):
        for a, b in zip(r["one"], r[name], strict=True):
            assert abs(a - b) <= LOSS_TOL * max(1.0, abs(a)), (name, r["one"], r[name])


@pytest.mark.timeout(150)
def test_tensor_and_pipeline_parallel_match_unsharded(tmp_path):
    out = tmp_path / "tp.json"
    launch_local([str(HERE), "tp", str(out)], 2, timeout_s=120)
    r = json.loads(out.read_text())
    for key, diff in r.items():
        assert diff <= TP_TOL, (key, r)
    assert {"tp_sp0", "tp_sp1", "pp_gpipe_grad", "pp_1f1b_grad", "pp_interleaved_1f1b_grad"} <= set(r)


@pytest.mark.timeout(150)
def test_fsdp_x_tensor_parallel_2d_matches_one_process(tmp_path):
    out = tmp_path / "2d.json"
    launch_local([str(HERE), "2d", str(out)], 4, timeout_s=120)
    r = json.loads(out.read_text())
    for a, b in zip(r["one"], r["2d"], strict=True):
        assert abs(a - b) <= LOSS_TOL * max(1.0, abs(a)), r


if __name__ == "__main__":
    {"dp": worker_dp, "tp": worker_tp, "2d": worker_2d}[sys.argv[1]](Path(sys.argv[2]))
