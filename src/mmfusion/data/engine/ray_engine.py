"""`--engine ray`: the build's chunk stage on Ray Data, for corpora that outgrow one machine.

The chunk tasks are rows of a Ray Dataset mapped by the same `run_chunk` function the local process pool
runs, so both engines write identical `.work/chunk-*` files and the rest of the build (de-duplication,
shards, reports) is shared. `ray.init()` joins a running cluster when RAY_ADDRESS is set, otherwise it
starts a local instance with `workers` CPUs, which is shut down at the end. The chunk files go to the
output folder, so on a multi-node cluster that folder must be shared storage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import ConfigError


def run_chunks_on_ray(
    fn: Callable[..., dict], tasks: list[tuple], workers: int, done: Callable[[dict], Any]
) -> None:
    """Run fn(*task) for every task as a Ray Data map (one task per row, `workers` CPUs when local); done()
    gets each result (a dict)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray Data: pip install 'ray[data]'") from None
    if not tasks:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        # one row (and block) per chunk task; the task's arguments travel in the row, pickled by Ray
        ds = ray.data.from_items([{"task": t} for t in tasks], override_num_blocks=len(tasks))
        for row in ds.map(lambda row: fn(*row["task"]), num_cpus=1).take_all():
            done(row)
    finally:
        if started:
            ray.shutdown()


__all__ = ["run_chunks_on_ray"]
