"""Test-only Trainer callbacks that inject faults (named in a config's `train.callbacks`; see clirun.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


class KillAfterStep:
    """SIGKILL this process after global step `step`, like a killed worker (no cleanup, no checkpoint of that
    step). `rank`: only that rank dies. `marker`: a file written just before dying; once it exists nothing
    dies again, so a restarted run gets through."""

    def __init__(self, step: int, rank: int | None = None, marker: str | None = None):
        self.step, self.rank, self.marker = step, rank, marker

    def on_step_end(self, trainer) -> None:
        if trainer.global_step != self.step or (self.rank is not None and trainer.rank != self.rank):
            return
        if self.marker:
            if Path(self.marker).exists():
                return
            Path(self.marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


def kill_after(step: int, rank: int | None = None, marker: str | None = None) -> list[str]:
    """`mmfusion train` arguments that add KillAfterStep(step, rank, marker) to the run."""
    args = {
        "step": step,
        **({"rank": rank} if rank is not None else {}),
        **({"marker": marker} if marker else {}),
    }
    inner = ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in args.items())
    return ["--set", f'train.callbacks=[{{target: "faults:KillAfterStep", args: {{{inner}}}}}]']


class KillFederatedClient:
    """SIGKILL a federated client process (mmfusion.federated.client) at local step `step` of round `round`,
    mid-round: its Trainer writes into <run>/clients/client-<client> and runs round r as stage r - 1."""

    def __init__(self, client: int, round: int, step: int):
        self.client, self.round, self.step = client, round, step

    def on_step_end(self, trainer) -> None:
        if trainer.run_dir.name != f"client-{self.client}" or trainer.stage is None:
            return
        if trainer.stage.index == self.round - 1 and trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
