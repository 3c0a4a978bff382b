"""Run the torchrun restart test N times in a row while other processes keep the CPU busy (issue 14).

Each round runs `tests/e2e/test_cli.py::test_torchrun_restart_after_a_killed_rank_matches_the_uninterrupted_run`
(a 2-rank run whose rank 1 is SIGKILLed after step 7; torchrun restarts both ranks and they must resume and
finish bitwise equal to an uninterrupted run, recovery < 60 s) in a fresh pytest process, with `--load` busy
processes running all along. Prints every round, then passes and the recovery time's min / median / max.
Exit status 1 when any round failed.

    .venv/bin/python benchmarks/restart_loop.py --runs 20 --load 2      # make bench-restart
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/e2e/test_cli.py::test_torchrun_restart_after_a_killed_rank_matches_the_uninterrupted_run"


def busy(n: int) -> list[subprocess.Popen]:
    """n processes that spin on a core each until killed."""
    return [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)
    ]


def one_round(timeout: float) -> tuple[bool, float | None, float, str]:
    """(passed, recovery seconds or None, wall seconds, tail of the output) of one pytest run of TEST."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", TEST],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n(killed after {timeout:.0f} s)"
    wall = time.perf_counter() - t0
    m = re.search(r"recovery: SIGKILL -> step 8 logged after the restart: ([0-9.]+) s", out)
    return proc.returncode == 0, float(m.group(1)) if m else None, wall, out[-3000:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20, help="rounds (default 20)")
    p.add_argument("--load", type=int, default=2, help="busy processes running meanwhile (default 2)")
    p.add_argument("--timeout", type=float, default=420, help="seconds before a round counts as hung")
    p.add_argument("--json", type=Path, help="also write the rounds and the summary here")
    args = p.parse_args(argv)
    load = busy(args.load)
    rounds = []
    try:
        for i in range(1, args.runs + 1):
            ok, rec, wall, tail = one_round(args.timeout)
            rounds.append({"round": i, "passed": ok, "recovery_s": rec, "wall_s": round(wall, 1)})
            shown = f"{rec:.1f} s" if rec is not None else "-"
            print(
                f"round {i:2d}/{args.runs}: {'pass' if ok else 'FAIL'}  recovery {shown}  wall {wall:.0f} s",
                flush=True,
            )
            if not ok:
                print(tail, flush=True)
    finally:
        for q in load:
            os.killpg(q.pid, signal.SIGKILL)
            q.wait()
    rec = [r["recovery_s"] for r in rounds if r["recovery_s"] is not None]
    passed = sum(r["passed"] for r in rounds)
    summary = {"runs": args.runs, "passed": passed, "load_processes": args.load, "cpus": os.cpu_count()}
    if rec:
        summary |= {
            "recovery_min_s": min(rec),
            "recovery_median_s": statistics.median(rec),
            "recovery_max_s": max(rec),
        }
    print(
        f"{passed}/{args.runs} passed with {args.load} busy processes on {os.cpu_count()} CPUs; recovery (SIGKILL -> "
        f"first step logged after the restart): min {min(rec, default=float('nan')):.1f} s, median "
        f"{statistics.median(rec) if rec else float('nan'):.1f} s, max {max(rec, default=float('nan')):.1f} s"
    )
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=2))
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
