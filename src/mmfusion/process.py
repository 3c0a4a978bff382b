"""Child processes that never outlive their parent: own session, signals forwarded, Linux parent-death signal.

A launcher (`mmfusion train --nproc`, `mmfusion serve --split`) runs its children in their own process group so
that one `killpg` stops everything they started, forwards SIGINT / SIGTERM to that group, and asks Linux to
signal each child when its parent dies (PR_SET_PDEATHSIG), so a SIGKILLed launcher (whose `finally` never
runs) leaves no orphan behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent dies; no-op on other systems.

    Safe as a `preexec_fn`. When the parent has already died (re-parented to init or a subreaper) the process
    exits at once, since the signal would never come."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to `proc`'s process group (it was started with start_new_session=True); ignore a gone group."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_forwarding_signals(
    cmd: Sequence[str], env: dict[str, str] | None = None, grace_s: float = 30.0
) -> int:
    """Run `cmd` in its own session and wait for it; SIGINT / SIGTERM received meanwhile are forwarded to its
    whole process group. If it has not exited `grace_s` seconds after the first forwarded signal, the group is
    SIGKILLed. Returns the child's exit code, or 128 + the signal number when a signal ended it or was
    forwarded to it (like a shell)."""
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True, preexec_fn=die_with_parent)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        kill_group(proc, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    deadline = None
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if received and deadline is None:
                    deadline = time.monotonic() + grace_s
                if deadline is not None and time.monotonic() > deadline:
                    kill_group(proc, signal.SIGKILL)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            kill_group(proc, signal.SIGKILL)
            proc.wait()
    if received:  # stopped on request: report the signal, like a shell, whatever the child chose to exit with
        return 128 + received[0]
    return 128 - rc if rc < 0 else rc
