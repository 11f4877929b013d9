"""Helpers shared by the benchmarks: machine description, the git commit measured and atomic JSON result files."""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tlfusion.console import configure_process
from tlfusion.fileio import write_json
from tlfusion.training.provenance import environment

configure_process()  # the tlfusion command's environment defaults, for the benchmarks that run tlfusion in-process

RESULTS_DIR = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


def machine_info(*packages: str) -> dict:
    """`tlfusion.training.provenance.environment(*packages)` (platform, CPUs, Python, package versions by distribution
    name, GPUs once TensorFlow is imported), the 1-minute load average (shared machines skew timings) and the git commit
    the benchmark runs at (``git_state``)."""
    return {
        **environment(*packages),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git": git_state(),
    }


def git(*args: str) -> str | None:
    """Output of ``git ARGS`` in the repository, stripped; None outside a git checkout or when git fails."""
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def git_state() -> dict:
    """The commit checked out and the tracked files that differ from it (``dirty``: any); a result records it so
    RESULTS.md can tell rows measured at HEAD from older ones. Commit and ``dirty`` are None outside a checkout."""
    changed = git("diff", "--name-only", "HEAD")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": None if changed is None else bool(changed),
        "dirty_paths": changed.splitlines() if changed else [],
    }


def write_result(name: str, payload: dict) -> Path:
    """Write ``payload`` to ``benchmarks/results/NAME.json`` atomically; when HEAD moved since ``machine_info``
    recorded it, the commit now is added as ``machine.git.commit_at_end`` (the run mixed two commits' code)."""
    recorded = payload.get("machine", {}).get("git")
    if recorded and recorded.get("commit") != (now := git("rev-parse", "HEAD")):
        recorded["commit_at_end"] = now
    return write_json(RESULTS_DIR / f"{name}.json", payload)


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the platform has none)."""
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None


def median(values: Sequence[float], digits: int = 3) -> float:
    """Rounded median of ``values``."""
    return round(statistics.median(values), digits)


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, summed (Linux /proc; 0 once the process is gone)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
            for children in Path(f"/proc/{current}/task").glob("*/children"):
                todo += [int(child) for child in children.read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def measure_command(command: Sequence[str], poll_s: float = 0.25, **popen) -> dict:
    """Run ``command``; wall seconds, exit code, peak RSS of its largest process (``wait4`` rusage, exact) and
    peak summed RSS of its process tree (polled every ``poll_s``), both in MiB."""
    started = time.perf_counter()
    process = subprocess.Popen(command, **popen)
    peak = [0]
    finished = threading.Event()

    def poll() -> None:
        while not finished.wait(poll_s):
            peak[0] = max(peak[0], tree_rss_bytes(process.pid))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, wait_status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    finished.set()
    poller.join()
    process.returncode = os.waitstatus_to_exitcode(wait_status)
    return {
        "wall_s": round(wall, 2),
        "returncode": process.returncode,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "peak_tree_rss_mib": round(peak[0] / 2**20, 1),
    }
