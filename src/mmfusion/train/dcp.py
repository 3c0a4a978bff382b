"""Sharded checkpoints (S3) with `torch.distributed.checkpoint`, for FSDP2 / tensor-parallel runs.

Layout (same naming as mmfusion.train.checkpoint, so its `list_checkpoints`/`latest_valid` apply)::

    <dir>/step-00000500/{__0_0.distcp, __1_0.distcp, ..., .metadata, state.json, MANIFEST.json}

Every rank writes its own shards into a temporary folder; rank 0 then (after a barrier) writes state.json,
fsyncs every file, writes the SHA-256 MANIFEST.json of every file last (checkpoint.publish) and renames the
folder into place. `load_sharded` verifies the manifest on rank 0 before torch's reader opens any file (it
unpickles `.metadata` and the non-tensor entries): under a directory, a checkpoint without a manifest, or
with a mismatching, missing or unlisted file, is skipped with a message and the previous one is used; a
damaged folder given by name raises CheckpointError naming the file. The manifest catches damage, not an
attacker (who can rewrite it too): load only sharded checkpoints from a trusted source. It loads into a
model sharded any way, at any world size (DCP reshards): saved at 2 ranks, loadable at 1 or 3.
`consolidate` writes a single safetensors file of the full model state dict.

Trainer entry points: `save_sharded(dir, step, model, optimizer, extra)`,
`load_sharded(dir_or_path, model, optimizer) -> (Checkpoint, extra) | None`, `consolidate(path, out)`.
Tensor-parallel tensors whose layout DCP cannot describe (the fused qkv projection's strided shards) are
stored whole and re-sharded on load.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from ..errors import CheckpointError
from .checkpoint import (
    MANIFEST,
    Checkpoint,
    latest_valid,
    publish,
    verify,
)

STATE = "state.json"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    if not _dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _is_strided(t: Any) -> bool:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard

    return isinstance(t, DTensor) and any(isinstance(p, _StridedShard) for p in t.placements)


def _map(obj: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map(v, fn) for v in obj]
    return fn(obj)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_sharded(
    ckpt_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Save model (+ optimizer) state from every rank (a collective); returns the final folder.

    `extra` (JSON-able: step counters, RNG seeds, config) goes to state.json. Keeps the newest `keep`.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step-{step:08d}"
    tmp = ckpt_dir / f".tmp-step-{step:08d}"
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    state = _map(_state(model, optimizer), lambda t: t.full_tensor() if _is_strided(t) else t)
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        world = dist.get_world_size() if _dist() else 1
        (tmp / STATE).write_text(json.dumps({**(extra or {}), "step": step, "world_size": world}))
        publish(tmp, final, step, sorted(p.name for p in tmp.iterdir() if p.is_file()), keep)
    _barrier()
    return final


def _choose(path: Path, log: Callable[[str], None]) -> tuple[str, int] | str | None:
    """(folder, step) of the checkpoint to load, None when there is none, or the message of a CheckpointError.
    Every file is checked against the SHA-256 manifest here, before torch's reader opens any of them."""
    if (path / ".metadata").is_file() or (path / MANIFEST).is_file():  # one checkpoint folder
        problem = verify(path)
        if problem is not None:
            return f"checkpoint {path} is damaged ({problem}); not loading it"
        return str(path), int(json.loads((path / MANIFEST).read_text())["step"])
    ckpt = latest_valid(path, log)
    return None if ckpt is None else (str(ckpt.path), ckpt.step)


def load_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Checkpoint, dict[str, Any]] | None:
    """Load the checkpoint folder `path`, or the newest valid one under the directory `path` (collective).

    The model (and optimizer) may be sharded differently, at another world size, than when saved.
    Returns (checkpoint, state.json contents), or None when no checkpoint under the directory verifies;
    a folder `path` that does not verify raises CheckpointError naming the file. Rank 0 verifies.
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.tensor import distribute_tensor

    chosen = _broadcast(_choose(Path(path), log) if _rank() == 0 else None)
    if isinstance(chosen, str):  # raised on every rank, so none waits in a collective
        raise CheckpointError(chosen)
    if chosen is None:
        return None
    ckpt = Checkpoint(Path(chosen[0]), chosen[1])
    template = _state(model, optimizer)
    strided: dict[int, Any] = {}

    def placeholder(t: Any) -> Any:
        if _is_strided(t):
            full = torch.empty(t.shape, dtype=t.dtype, device=t.to_local().device)
            strided[id(full)] = t
            return full
        return t

    state = _map(template, placeholder)
    try:
        dcp.load(state, checkpoint_id=str(ckpt.path))
    except BaseException as e:  # CheckpointException derives from BaseException
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        raise CheckpointError(f"cannot load sharded checkpoint {ckpt.path}: {e}") from None

    def reshard(t: Any) -> Any:
        like = strided.get(id(t))
        return t if like is None else distribute_tensor(t, like.device_mesh, like.placements)

    state = _map(state, reshard)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = json.loads((ckpt.path / STATE).read_text())
    return ckpt, extra


def load_full_state(path: str | Path) -> dict[str, Any]:
    """The whole checkpoint as one nested dict of full tensors ({"model": ..., "optim": ...}), 1 process."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged ({problem})")
    state: dict[str, Any] = {}
    # what torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, without the temporary file
    _load_state_dict(
        state,
        storage_reader=dcp.FileSystemReader(str(path)),
        planner=_EmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    return state


def consolidate(path: str | Path, out_file: str | Path | None = None) -> Path:
    """Write the full model state dict of a sharded checkpoint to one safetensors file (default
    <path>/../<name>.safetensors); loadable with `model.load_state_dict(safetensors.torch.load_file(f))`."""
    from safetensors.torch import save_file

    path = Path(path)
    out = Path(out_file) if out_file else path.parent / f"{path.name}.safetensors"
    state = load_full_state(path)
    # the empty-dict planner may return flattened "model.<fqn>" keys instead of a nested dict
    model = state.get("model") or {k[6:]: v for k, v in state.items() if k.startswith("model.")}
    if not model:
        raise CheckpointError(f"checkpoint {path} holds no model state")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, str(out))
    return out
