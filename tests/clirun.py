"""How tests run commands in subprocesses: their own session, a hard timeout, the whole group killed.

`tests/` is on pytest's `pythonpath` (pyproject.toml), so every test module can `from clirun import ...`, and the
subprocesses get it on PYTHONPATH, so a config can name the test-only callbacks in `faults.py`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def _env(env: dict[str, str] | None) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path, **(env or {})}


def run_group(cmd: list[str], cwd, env=None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `cmd` in a new session with output captured. On timeout SIGKILL its whole process group (torchrun
    ranks die with torchrun: mmfusion.process.die_with_parent) and raise AssertionError with what it printed."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"{' '.join(map(str, cmd))} timed out after {timeout:.0f} s\n{out[-6000:]}\n{err[-6000:]}"
        ) from None
    finally:
        try:  # anything it started and left behind in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_mmfusion(
    *args, cwd, env=None, timeout: float = 240, check: bool = True
) -> subprocess.CompletedProcess:
    """`python -m mmfusion.cli *args` in `cwd` (run_group); AssertionError with its output when check and it
    fails."""
    proc = run_group([sys.executable, "-m", "mmfusion.cli", *map(str, args)], cwd, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mmfusion {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc
