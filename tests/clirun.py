"""How tests run commands in subprocesses: their own session, a hard timeout, the whole group killed.

`tests/` is on pytest's `pythonpath` (pyproject.toml), so every test module can `from clirun import ...`, and the
subprocesses get it on PYTHONPATH, so a config can name the test-only callbacks in `faults.py`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).parent

# monotonic time by which the running test must be done (tests/conftest.py sets it from the test's pytest-timeout
# minus a margin): a subprocess never gets more than what is left, so inner timeouts can never add up to more
# than the test's own, and a stuck command fails with its output instead of a pytest-timeout stack dump
DEADLINE: float | None = None


def _env(env: dict[str, str] | None) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    base = {"CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path, "OMP_WAIT_POLICY": "PASSIVE"}  # see conftest.py
    return {**os.environ, **base, **(env or {})}


def run_group(cmd: list[str], cwd, env=None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `cmd` in a new session with output captured. On timeout (`timeout`, or what is left of the test's
    budget) SIGKILL its whole process group (torchrun ranks die with torchrun: mmfusion.process.die_with_parent)
    and raise AssertionError with what it printed."""
    if DEADLINE is not None:
        left = DEADLINE - time.monotonic()
        if left < timeout:
            timeout = max(left, 1.0)
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
