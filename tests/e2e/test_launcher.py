"""`mmfusion train --nproc 2` leaves no process behind: SIGTERM to the launcher stops torchrun and both ranks,
and a SIGKILLed launcher takes them down too (Linux parent-death signals, mmfusion.process)."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from clirun import _env

TINY = Path(__file__).with_name("tiny.yaml")


def _pids_with(token: str) -> set[int]:
    """Live processes whose command line contains `token`."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if token in cmd and state != "Z":
            found.add(int(entry))
    return found


def _wait_for(cond, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.25)
    return cond()


def _start(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """A 2-rank run long enough to be interrupted; returns once both ranks have trained a logged step."""
    name = f"sig-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "mmfusion.cli", "train", "--config", str(TINY), "--nproc", "2", "--no-eval"]
    cmd += ["--set", f"name={name}", "--set", "train.steps=100000", "--set", "train.checkpoint_every=100000"]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=_env(None),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    metrics = tmp_path / "runs" / name / "metrics.jsonl"
    try:
        assert _wait_for(lambda: metrics.is_file() and metrics.read_text().strip(), 120), (
            "training never started"
        )
        # the launcher, torchrun and two ranks
        assert _wait_for(lambda: len(_pids_with(f"name={name}")) >= 4, 10), _pids_with(f"name={name}")
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc, name


@pytest.mark.timeout(200)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_signalled_launcher_leaves_no_process_behind(tmp_path, sig):
    proc, name = _start(tmp_path)
    others = _pids_with(f"name={name}") - {proc.pid}
    try:
        os.kill(proc.pid, sig)  # the launcher alone, as a user's kill or a scheduler would
        rc = proc.wait(timeout=60)
        assert _wait_for(lambda: not _pids_with(f"name={name}"), 45), _pids_with(f"name={name}")
    finally:
        for pid in _pids_with(f"name={name}"):
            os.kill(pid, signal.SIGKILL)
    assert len(others) >= 3  # torchrun and two ranks were running
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM), rc
