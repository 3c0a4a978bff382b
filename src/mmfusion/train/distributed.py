"""Process-group helpers for `torchrun` launches (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from ..losses import gather_with_grad  # noqa: F401 - re-exported (it lives with the losses that use it)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_from_env(device: torch.device, timeout_s: float = 300.0, init_timeout_s: float = 60.0) -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1).

    Returns True when a group was created. Collectives time out after `timeout_s` instead of hanging; joining
    the group (finding every peer's address in the store) fails after `init_timeout_s`, so a restart whose peer
    died again fails fast and torchrun restarts again.

    Under torchrun the ranks share the launcher agent's TCPStore, and it keeps every key across restarts:
    a restarted rank used to read the *killed* peer's gloo address from the previous attempt and either
    failed ("Connection refused") or hung in gloo's connect (whose listening side has no timeout:
    pytorch/gloo#520). Each restart attempt therefore joins under its own key prefix
    (`mmfusion/attempt-<TORCHELASTIC_RESTART_COUNT>`; on several nodes, whose agents may count restarts
    differently, launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so every attempt gets a new store).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=world,
        is_master=False if _agent_store() else rank == 0,
        timeout=datetime.timedelta(seconds=init_timeout_s),
        wait_for_workers=False,
    )
    store = dist.PrefixStore(f"mmfusion/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    # joining is bounded by init_timeout_s (the group's timeout while it is created), collectives by timeout_s
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=init_timeout_s),
    )
    set_group_timeout(timeout_s)
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Destroy the default process group (when there is one) before the process exits: a rank whose gloo
    threads are still up at interpreter shutdown can abort ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def set_group_timeout(timeout_s: float, group: dist.ProcessGroup | None = None) -> None:
    """Bound every later collective of `group` (default: the default group) by `timeout_s` seconds."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)


def _agent_store() -> bool:
    """True when torchrun's agent hosts the TCPStore (its default): every rank is a client."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)


def _reduce_device() -> torch.device:
    """Where a collective's tensor must live: the current GPU under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: float) -> float:
    """Average a Python float over ranks (for logging)."""
    if not is_distributed():
        return value
    return all_reduce_sum([value])[0] / dist.get_world_size()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a list of Python floats over ranks (for logging); every rank passes the same length."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
