"""Parallelism beyond plain data parallel (S1): FSDP2, tensor parallel, pipeline parallel, device meshes.

Trainer entry points (all optional; with the defaults nothing changes)::

    mesh = build_mesh(cfg.parallel)                     # None when not distributed
    model = apply_parallelism(model, cfg.parallel, mesh)   # TP, then FSDP2 or DDP (+ comm hook)
    optimizer = handle.wrap_optimizer(optimizer)        # handle = comm_handle(model) (local SGD only)

The mesh always has the dimensions ("pp", "dp", "tp"); dp = world / (pp * tp).

* data parallel: DDP over the "dp" dimension (`data: true`, the default), with a communication hook
  from `parallel.comm` (see mmfusion.train.comm);
* FSDP2: `fully_shard` on every `layers.Block` and on the root, over "dp", replacing DDP;
* tensor parallel: every `layers.Block` is sharded over "tp" — attention heads (fused `attn.qkv`
  column-parallel with each rank holding the q, k and v rows of its heads, `attn.out` row-parallel) and
  the MLP (`mlp.fc1` column-, `mlp.fc2` row-parallel); `sequence_parallel` also shards the LayerNorms and
  the residual stream on the token dimension. Combines with FSDP over "dp" (2-D);
* pipeline: `build_pipeline` splits a `layers.Transformer` stack into stages over "pp" and returns a
  `torch.distributed.pipelining` schedule (GPipe, 1F1B, Interleaved1F1B). It drives its own
  forward/backward (`schedule.step`), so it is used instead of `model(x)`, not through apply_parallelism.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..layers import Attention, Block, Transformer
from ..process import die_with_parent, kill_group
from .comm import CommHandle, register_comm_hook
from .config import (  # noqa: F401 - the parallel config classes live in config.py, re-exported here
    CommConfig,
    FSDPConfig,
    ParallelConfig,
    PipelineConfig,
    TensorConfig,
)
from .distributed import init_from_env, set_group_timeout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MESH_DIMS = ("pp", "dp", "tp")


# ----------------------------------------------------------------------------------------- meshes


def mesh_shape(cfg: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(pp, dp, tp) for `world_size` processes; ValueError when it does not divide."""
    pp, tp = cfg.pipeline.size, cfg.tensor.size
    if world_size % (pp * tp):
        raise ValueError(
            f"world size {world_size} is not divisible by pipeline.size * tensor.size = {pp} * {tp}"
        )
    return pp, world_size // (pp * tp), tp


def build_mesh(cfg: ParallelConfig, world_size: int | None = None, device_type: str | None = None) -> Any:
    """An `init_device_mesh` with dims ("pp", "dp", "tp"), or None in a single process.

    Initialises the default process group from torchrun's environment when needed (gloo on CPU, NCCL on
    CUDA, collectives bounded by `cfg.timeout_s`).
    """
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        init_from_env(torch.device(device_type), cfg.timeout_s, cfg.init_timeout_s)
    world = world_size or dist.get_world_size()
    mesh = init_device_mesh(device_type, mesh_shape(cfg, world), mesh_dim_names=MESH_DIMS)
    for dim in MESH_DIMS:  # new groups default to torch's 30-minute bound: give them the run's
        set_group_timeout(cfg.timeout_s, mesh.get_group(dim))
    return mesh


def _size(mesh: Any, dim: str) -> int:
    return 1 if mesh is None else mesh[dim].size()


# -------------------------------------------------------------------------------- tensor parallel


def _qkv_style(sequence_parallel: bool) -> Any:
    """ColwiseParallel for the fused qkv projection: each rank keeps the q, k and v rows of its heads.

    The weight is a DTensor with `_StridedShard(0, split_factor=3)`: full_tensor() is the ordinary
    [q; k; v] layout, so state dicts are unchanged; mmfusion.train.dcp saves such tensors whole.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel
    from torch.distributed.tensor.placement_types import _StridedShard

    class FusedQKVColwise(ColwiseParallel):
        def _partition_linear_fn(self, name, module, device_mesh):
            for pname, param in module.named_parameters():
                dist_param = nn.Parameter(
                    distribute_tensor(param, device_mesh, [_StridedShard(0, split_factor=3)]),
                    requires_grad=param.requires_grad,
                )
                module.register_parameter(pname, dist_param)

        @staticmethod
        def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
            # keep the strided layout (ColwiseParallel would redistribute to a contiguous Shard(-1))
            return outputs.to_local() if use_local_output else outputs

    return FusedQKVColwise(input_layouts=Shard(1) if sequence_parallel else Replicate())


def _tp_attention_forward(
    self: Attention, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """Attention.forward on this rank's heads (qkv output is local: 3 * local_heads * head_dim wide)."""
    qkv = self.qkv(x)
    b, n, _ = qkv.shape
    head_dim = self.qkv.in_features // self.heads
    local_heads = self.heads // self.tp_size
    q, k, v = qkv.view(b, n, 3, local_heads, head_dim).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    return self.out(y.transpose(1, 2).reshape(b, n, local_heads * head_dim))


def block_tp_plan(sequence_parallel: bool = False) -> dict[str, Any]:
    """The `parallelize_module` plan for one `layers.Block` (module names as in layers.py)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    seq_in = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, Any] = {
        "attn.qkv": _qkv_style(sequence_parallel),
        "attn.out": RowwiseParallel(output_layouts=seq_in),
        "mlp.fc1": ColwiseParallel(input_layouts=seq_in),
        "mlp.fc2": RowwiseParallel(output_layouts=seq_in),
    }
    if sequence_parallel:
        plan["ln_1"] = SequenceParallel()
        plan["ln_2"] = SequenceParallel()
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any, sequence_parallel: bool = False) -> nn.Module:
    """Shard every `Block` of every `Transformer` in `model` over `tp_mesh` (in place; returns model).

    With sequence parallel the residual stream inside each Transformer is split on the token dimension
    (tokens must divide by the tp size); the Transformer's input and output stay whole (replicated).
    Parameters outside the Transformer stacks (embeddings, heads) stay replicated plain tensors.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        PrepareModuleInput,
        PrepareModuleOutput,
        parallelize_module,
    )

    tp = tp_mesh.size()
    stacks = [m for m in model.modules() if isinstance(m, Transformer)]
    if not stacks:
        raise ValueError("tensor parallel found no layers.Transformer in the model")
    for stack in stacks:
        for block in stack.blocks:
            assert isinstance(block, Block)
            if block.attn.heads % tp:
                raise ValueError(f"{block.attn.heads} heads do not divide over tensor.size={tp}")
            parallelize_module(block, tp_mesh, block_tp_plan(sequence_parallel))
            block.attn.tp_size = tp
            block.attn.forward = types.MethodType(_tp_attention_forward, block.attn)
        if sequence_parallel:
            parallelize_module(
                stack,
                tp_mesh,
                {
                    "": PrepareModuleInput(
                        input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
                    )
                },
            )
            parallelize_module(
                stack,
                tp_mesh,
                {
                    "": PrepareModuleOutput(
                        output_layouts=(Shard(1),),
                        desired_output_layouts=(Replicate(),),
                        use_local_output=True,
                    )
                },
            )
    return model


# ------------------------------------------------------------------------------------------ FSDP2


def apply_fsdp(model: nn.Module, dp_mesh: Any, cfg: FSDPConfig, device_type: str = "cpu") -> nn.Module:
    """`fully_shard` every `Block` and then the root (in place; returns model)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": dp_mesh, "reshard_after_forward": cfg.reshard_after_forward}
    if cfg.param_dtype or cfg.reduce_dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=DTYPES[cfg.param_dtype] if cfg.param_dtype else None,
            reduce_dtype=DTYPES[cfg.reduce_dtype] if cfg.reduce_dtype else None,
        )
    if cfg.cpu_offload:
        check_cpu_offload(device_type)
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def check_cpu_offload(device_type: str) -> None:
    if device_type == "cpu":
        raise ValueError(
            "parallel.fsdp.cpu_offload needs an accelerator: it moves sharded parameters off the GPU, "
            "but this run computes on the CPU already (set cpu_offload: false)"
        )


# --------------------------------------------------------------------------------------- combined


def apply_parallelism(
    model: nn.Module, cfg: ParallelConfig, mesh: Any, device: torch.device | str | None = None
) -> nn.Module:
    """Apply TP (over "tp"), then FSDP2 or DDP (over "dp") to `model`, as `cfg` says; returns the model.

    The DDP wrapper (when used) carries the comm hook handle as `model.comm_handle` (see `comm_handle`).
    `mesh` None (single process) returns `model` unchanged. Pipeline parallel is `build_pipeline`.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if cfg.fsdp.cpu_offload:
        check_cpu_offload(device.type)
    if mesh is None:
        return model
    if _size(mesh, "pp") > 1:
        raise ValueError("pipeline.size > 1: build the stages with parallel.build_pipeline")
    tp, dp = _size(mesh, "tp"), _size(mesh, "dp")
    if tp > 1:
        apply_tensor_parallel(model, mesh["tp"], cfg.tensor.sequence_parallel)
    if cfg.fsdp.enabled:
        return apply_fsdp(model, mesh["dp"], cfg.fsdp, device.type)
    if cfg.data and dp > 1:
        if tp > 1:
            raise ValueError("tensor parallel combines with fsdp over dp, not with DDP (set fsdp.enabled)")
        from torch.nn.parallel import DistributedDataParallel as DDP

        group = mesh["dp"].get_group()
        kwargs: dict[str, Any] = {}
        if cfg.comm.hook == "powersgd" and dist.get_backend(group) == "gloo":
            # PowerSGD issues its second all-reduce from a future callback; on gloo the callbacks of
            # several buckets can run in a different order on each rank (a collective mismatch), so
            # use one bucket (an explicit cap also applies to DDP's small first bucket)
            kwargs["bucket_cap_mb"] = 4096
        ddp = DDP(
            model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group, **kwargs
        )
        ddp.comm_handle = register_comm_hook(ddp, cfg.comm)
        return ddp
    return model


def comm_handle(model: nn.Module) -> CommHandle:
    """The communication hook handle of a model returned by `apply_parallelism` (a no-op one otherwise)."""
    return getattr(model, "comm_handle", None) or CommHandle("none")


# --------------------------------------------------------------------------------------- pipeline


class StageBlocks(nn.Module):
    """A contiguous slice of a Transformer's blocks, run as one pipeline stage (x only, no mask)."""

    def __init__(self, blocks: Sequence[nn.Module], is_causal: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.is_causal = is_causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, is_causal=self.is_causal)
        return x


def stage_ranges(depth: int, n_stages: int) -> list[tuple[int, int]]:
    """Split `depth` blocks into `n_stages` contiguous [start, end) ranges, sizes differing by at most 1."""
    if n_stages > depth:
        raise ValueError(f"{n_stages} pipeline stages for only {depth} blocks")
    base, extra = divmod(depth, n_stages)
    out, start = [], 0
    for i in range(n_stages):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them (`step(x)` on the first stage's rank,
    `step(target=y, losses=[])` on the last stage's rank, `step()` elsewhere)."""

    schedule: Any
    stages: list[Any]
    modules: list[StageBlocks]
    stage_indices: list[int]
    n_stages: int

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_indices

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_indices

    def parameters(self):
        for m in self.modules:
            yield from m.parameters()


def build_pipeline(
    stack: Transformer,
    cfg: PipelineConfig,
    pp_mesh_or_group: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device | str = "cpu",
    is_causal: bool = False,
) -> Pipeline:
    """Split `stack.blocks` into `size * stages_per_rank` stages (rank r holds stages r, r + size, ...).

    Each rank keeps only its blocks (deep copies of `stack`'s, so every rank must build `stack` with the
    same weights, e.g. the same seed). Gradients are those of the mean of `loss_fn` over microbatches.
    """
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    group = pp_mesh_or_group.get_group() if hasattr(pp_mesh_or_group, "get_group") else pp_mesh_or_group
    pp_rank, pp_size = dist.get_rank(group), dist.get_world_size(group)
    if pp_size != cfg.size:
        raise ValueError(f"pipeline.size={cfg.size} but the pipeline group has {pp_size} ranks")
    n_stages = pp_size * cfg.stages_per_rank
    ranges = stage_ranges(len(stack.blocks), n_stages)
    device = torch.device(device)
    indices = [pp_rank + k * pp_size for k in range(cfg.stages_per_rank)]
    import copy

    modules = [
        StageBlocks([copy.deepcopy(stack.blocks[j]) for j in range(*ranges[i])], is_causal).to(device)
        for i in indices
    ]
    for m in modules:
        m.zero_grad(set_to_none=True)
    stages = [
        PipelineStage(m, i, n_stages, device, group=group) for m, i in zip(modules, indices, strict=True)
    ]
    if cfg.schedule == "interleaved_1f1b":
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=cfg.microbatches, loss_fn=loss_fn)
    else:
        cls = ScheduleGPipe if cfg.schedule == "gpipe" else Schedule1F1B
        schedule = cls(stages[0], n_microbatches=cfg.microbatches, loss_fn=loss_fn)
    return Pipeline(schedule, stages, modules, indices, n_stages)


# ------------------------------------------------------------------------------- local launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(
    argv: Sequence[str],
    world_size: int,
    timeout_s: float,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> list[str]:
    """Run `python *argv` as `world_size` ranks on this machine (torchrun's env vars, a free port).

    Waits at most `timeout_s` in total; on a timeout or any failing rank every rank still running is
    killed with its process group and RuntimeError carries every rank's output. Returns each rank's output.
    """
    port = _free_port()
    base = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    procs, logs = [], []
    try:
        for r in range(world_size):
            log = tempfile.TemporaryFile(mode="w+")
            logs.append(log)
            rank_env = {
                **base,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, *argv],
                    env=rank_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    start_new_session=True,  # one killpg stops the rank and anything it started
                    preexec_fn=die_with_parent,
                )
            )
        deadline = time.monotonic() + timeout_s
        failed = None
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout_s:.0f} s"
                break
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(2.0)  # let the others report, then stop them
                failed = "a rank failed"
                break
            time.sleep(0.05)
        if failed is None and any(p.returncode != 0 for p in procs):
            failed = "a rank failed"
    finally:
        for p in procs:
            kill_group(p)  # also reaps what a rank started (DataLoader workers), even when it exited itself
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if failed:
        text = "\n".join(
            f"--- rank {r} (rc {p.returncode}) ---\n{o[-4000:]}"
            for r, (p, o) in enumerate(zip(procs, outputs, strict=True))
        )
        raise RuntimeError(f"launch_local {argv}: {failed}\n{text}")
    return outputs
