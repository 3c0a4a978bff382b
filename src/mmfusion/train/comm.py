"""Compressed gradient communication for DDP (S2): fp16 / PowerSGD hooks, local SGD, byte counting.

Trainer entry point::

    handle = register_comm_hook(ddp_model, comm_cfg)          # after wrapping in DDP
    optimizer = handle.wrap_optimizer(optimizer)               # local SGD: averages every K steps

`CommConfig.compress_ratio` (the seed config's ``"compress_ratio": 0.3``) is the target fraction of the
plain all-reduce payload to send per step. For PowerSGD it is mapped to a matrix-approximation rank by
`powersgd_rank_for_ratio`: every gradient is viewed as a (rows, numel/rows) matrix like PowerSGD does, a
rank-r matrix sends r*(rows+cols) values when it is compressed (PowerSGD compresses only when that is
less than half the matrix, `min_compression_rate=2`) and 1-D tensors (biases, norms) are sent whole; the
largest rank whose total stays within `compress_ratio` of the dense payload is chosen (at least 1).
For fp16 the ratio is fixed at 0.5 and for local SGD it is about 1/period (parameters every K steps).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import CommConfig, HookKind  # noqa: F401 - defined in config.py, re-exported


def _backend(group: Any = None) -> str:
    return str(dist.get_backend(group)).lower()


def _should_compress(rows: int, cols: int, rank: int, min_compression_rate: float = 2.0) -> bool:
    return (rows + cols) * rank * min_compression_rate < rows * cols


def powersgd_payload(shapes: Iterable[torch.Size], rank: int, min_compression_rate: float = 2.0) -> int:
    """Values PowerSGD all-reduces per step for gradients of these shapes (P and Q, plus uncompressed)."""
    total = 0
    for shape in shapes:
        numel = math.prod(shape)
        if len(shape) < 2:
            total += numel
            continue
        rows = shape[0]
        cols = numel // rows
        r = min(rank, rows, cols)
        total += (rows + cols) * r if _should_compress(rows, cols, r, min_compression_rate) else numel
    return total


def powersgd_rank_for_ratio(model: nn.Module, ratio: float, max_rank: int = 256) -> int:
    """The largest PowerSGD rank whose payload is at most `ratio` of the dense payload (at least 1)."""
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    dense = sum(math.prod(s) for s in shapes)
    best = 1
    for r in range(1, max_rank + 1):
        if powersgd_payload(shapes, r) <= ratio * dense:
            best = r
        else:
            break
    return best


@dataclass
class CommHandle:
    """What `register_comm_hook` set up: the hook kind, its state and (local SGD) the averager."""

    kind: str
    state: Any = None
    averager: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Local SGD: an optimizer that averages parameters every K steps; otherwise `optimizer` itself."""
        if self.averager is None:
            return optimizer
        from torch.distributed.optim import PostLocalSGDOptimizer

        return PostLocalSGDOptimizer(optimizer, self.averager)


def register_comm_hook(ddp_model: nn.Module, cfg: CommConfig | str, **overrides: Any) -> CommHandle:
    """Register the configured communication hook on a `DistributedDataParallel` model.

    `cfg` may be a `CommConfig` or just the hook name (other fields from `overrides`).
    bf16 compression is refused on gloo (it has no bfloat16 all-reduce): ValueError naming the backend.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if isinstance(cfg, str):
        cfg = CommConfig(hook=cfg, **overrides)  # type: ignore[arg-type]
    elif overrides:
        cfg = cfg.model_copy(update=overrides)
    group = getattr(ddp_model, "process_group", None)
    kind = cfg.hook
    if kind is None:
        return CommHandle("builtin")
    if kind == "allreduce":
        ddp_model.register_comm_hook(group, default_hooks.allreduce_hook)
        return CommHandle(kind)
    if kind == "fp16":
        ddp_model.register_comm_hook(group, default_hooks.fp16_compress_hook)
        return CommHandle(kind, info={"ratio": 0.5})
    if kind == "bf16":
        backend = _backend(group)
        if backend == "gloo":
            raise ValueError(
                "bf16 gradient compression needs NCCL: the gloo backend (CPU) has no bfloat16 all-reduce; "
                "use parallel.comm.hook=fp16 or powersgd on gloo"
            )
        ddp_model.register_comm_hook(group, default_hooks.bf16_compress_hook)
        return CommHandle(kind, info={"ratio": 0.5})
    if kind == "powersgd":
        module = getattr(ddp_model, "module", ddp_model)
        if cfg.powersgd_rank is not None:
            rank = cfg.powersgd_rank
        else:
            rank = powersgd_rank_for_ratio(module, cfg.compress_ratio or 0.3)
        shapes = [p.shape for p in module.parameters() if p.requires_grad]
        dense = sum(math.prod(s) for s in shapes)
        state = powerSGD_hook.PowerSGDState(
            process_group=group,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=cfg.powersgd_start_iter,
            use_error_feedback=True,
            warm_start=True,
            random_seed=0,
        )
        ddp_model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return CommHandle(kind, state, info={"rank": rank, "ratio": powersgd_payload(shapes, rank) / dense})
    if kind == "local_sgd":
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
            PostLocalSGDState,
            post_localSGD_hook,
        )
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

        # every rank is its own subgroup: after warm-up no gradient is communicated at all
        subgroup, _ = dist.new_subgroups(group_size=1)
        state = PostLocalSGDState(
            process_group=group, subgroup=subgroup, start_localSGD_iter=cfg.local_sgd_warmup
        )
        ddp_model.register_comm_hook(state, post_localSGD_hook)
        averager = PeriodicModelAverager(
            period=cfg.local_sgd_period, warmup_steps=cfg.local_sgd_warmup, process_group=group
        )
        return CommHandle(kind, state, averager, info={"period": cfg.local_sgd_period})
    raise ValueError(f"unknown communication hook {kind!r}")


class ByteCounter:
    """Sums the payload bytes passed to `torch.distributed.all_reduce` (per rank, before the wire protocol)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0
        self._lock = threading.Lock()

    def add(self, tensor: torch.Tensor) -> None:
        with self._lock:
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1


@contextlib.contextmanager
def count_allreduce_bytes() -> Iterator[ByteCounter]:
    """Count what Python-side hooks (allreduce, fp16, PowerSGD, local SGD averaging) all-reduce.

    A measurement tool for benchmarks/tests: it patches `torch.distributed.all_reduce` while active.
    DDP's built-in C++ all-reduce (no hook) bypasses it, so compare against the `allreduce` hook.
    """
    counter = ByteCounter()
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        if dist.get_world_size(group) > 1:  # a one-rank group (local SGD's subgroups) sends nothing
            counter.add(tensor)
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        yield counter
    finally:
        dist.all_reduce = original  # type: ignore[assignment]
