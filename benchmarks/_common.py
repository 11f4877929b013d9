"""Helpers shared by the benchmarks: machine description and atomic JSON result files."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tlfusion.fileio import write_json

RESULTS_DIR = Path(__file__).parent / "results"


def machine_info(*packages: str) -> dict:
    """Platform, CPU count, 1-minute load average (shared machines skew timings), Python version
    and the installed versions of ``packages`` (distribution names)."""
    versions = {}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "packages": versions,
    }


def write_result(name: str, payload: dict) -> Path:
    """Write ``payload`` to ``benchmarks/results/NAME.json`` atomically."""
    return write_json(RESULTS_DIR / f"{name}.json", payload)
