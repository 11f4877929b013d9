"""Where a model's numbers come from: the images a backbone was trained on and the machine that trained it.

`seen_images.txt` (one `sha256  path` line per training/validation image) travels with every trained backbone so
that a later evaluation can count the test images the backbone has already seen. `environment()` describes the
machine and package versions; training records it in `train.json` and the benchmarks in their results.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tlfusion.data.images import file_sha256
from tlfusion.fileio import write_text

SEEN_IMAGES = "seen_images.txt"
TRAINING_PACKAGES = ("tensorflow", "keras", "numpy")


def write_seen_images(path: str | Path, paths: Iterable[str | Path]) -> None:
    """`sha256  path` per image (paths relative to their common folder), written atomically to `path`."""
    paths = [str(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    write_text(path, "".join(f"{file_sha256(p)}  {os.path.relpath(p, root)}\n" for p in paths))


def read_seen_images(path: str | Path) -> set[str]:
    """The sha256 of every image listed in a `seen_images.txt` written by `write_seen_images`."""
    return {line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()}


def environment(*packages: str) -> dict[str, Any]:
    """Platform, processor, CPU count, Python, the versions of `packages` (distribution names; an imported module of
    that name answers when the distribution is not installed under it, e.g. `tensorflow` from `tensorflow-cpu`;
    None when neither) and, once TensorFlow is imported, the GPUs it sees."""
    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "packages": {package: _version(package) for package in packages},
    }
    if "tensorflow" in sys.modules:
        facts["gpus"] = [device.name for device in sys.modules["tensorflow"].config.list_physical_devices("GPU")]
    return facts


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return getattr(sys.modules.get(package), "__version__", None)
