"""The end-to-end tests' way to run the `mmfusion` command: a subprocess on CPU with a hard timeout."""

import os
import subprocess
import sys

import pytest


def run_mmfusion(*args, cwd, env=None, timeout=240, check=True) -> subprocess.CompletedProcess:
    """`python -m mmfusion.cli *args` in `cwd`; raises AssertionError with its output when check and it fails."""
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "mmfusion.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mmfusion {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def mmfusion():
    return run_mmfusion
