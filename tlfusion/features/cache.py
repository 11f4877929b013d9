"""The on-disk feature cache: per (model, preprocessing) key, append-only chunks of features keyed by image sha256.

See `tlfusion.features.extraction` for the layout; a chunk is visible only once its hash list (written last) exists.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tlfusion.fileio import write_bytes

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bump when decoding or preprocessing changes what a cached feature means: old entries are then never read."""


class FeatureCache:
    """Cached features of one (model, preprocessing) key: append-only chunks, each committed by its hash list."""

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def open(cls, cache_dir: Path, model_key: str, image_size: int, clahe: bool) -> FeatureCache:
        """The cache folder for a model and preprocessing (created with its key.json on first use)."""
        key = {"model": model_key, "image_size": int(image_size), "clahe": bool(clahe), "format": CACHE_FORMAT}
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        folder = cache_dir / name
        if not (folder / "key.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            write_bytes(folder / "key.json", json.dumps(key, indent=1).encode())
        return cls(folder)

    def lookup(self, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached feature rows of those `hashes` that are in the cache; an unreadable chunk (not regular files, not
        text, not a float array with one row per hash) is a stale entry: warned about and ignored."""
        wanted = set(hashes)
        found: dict[str, np.ndarray] = {}
        for index in sorted(self.folder.glob("chunk-*.txt")):
            chunk_hashes = _chunk_hashes(index)
            if chunk_hashes is not None and wanted.isdisjoint(chunk_hashes):
                continue
            rows = None if chunk_hashes is None else _chunk_rows(index.with_suffix(".npy"), len(chunk_hashes))
            if rows is None:
                logger.warning("features: ignoring unreadable cache chunk %s", index)
                continue
            found.update((digest, np.array(rows[i])) for i, digest in enumerate(chunk_hashes) if digest in wanted)
        return found

    def append(self, hashes: Sequence[str], features: np.ndarray) -> None:
        """Add one chunk: its features first, then the hash list that makes it visible."""
        chunk = self.folder / f"chunk-{uuid.uuid4().hex}"
        write_bytes(chunk.with_suffix(".npy"), npy_bytes(np.asarray(features, dtype=np.float32)))
        write_bytes(chunk.with_suffix(".txt"), "".join(f"{digest}\n" for digest in hashes).encode())


def remove_uncommitted(cache_dir: Path) -> None:
    """Delete the chunk features under `cache_dir` whose hash list was never written (an extraction killed between
    the two). Only for a caller that holds the lock of the run folder `cache_dir` belongs to, so that no writer is
    between the two files."""
    for features in cache_dir.glob("*/chunk-*.npy"):
        if not features.with_suffix(".txt").exists():
            features.unlink()


def _chunk_hashes(index: Path) -> list[str] | None:
    """A chunk's image hashes, None when its index is not a readable regular text file."""
    if not index.is_file():
        return None
    try:
        return index.read_text(encoding="ascii").split()
    except (OSError, UnicodeError):
        return None


def _chunk_rows(path: Path, count: int) -> np.ndarray | None:
    """A chunk's features (memory-mapped), None unless a regular `.npy` of `count` float rows."""
    if not path.is_file():
        return None
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return rows if rows.ndim == 2 and rows.dtype.kind == "f" and len(rows) == count else None


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
