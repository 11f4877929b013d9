"""Bundle prediction sharded over a Dask distributed cluster (`tlfusion predict --scheduler tcp://HOST:8786`).

The driver checks the bundle's manifest and sends its folder and sha256; each worker loads the bundle once
(`tlfusion.bundle.folder.load_bundle`, kept in its `features.cluster.WorkerState`) after checking that the manifest is
the one the driver checked, and returns the probabilities of its shard. Workers see the bundle and images at the
driver's paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tlfusion.bundle.folder import MANIFEST, load_bundle
from tlfusion.bundle.model import Bundle
from tlfusion.data.images import file_sha256
from tlfusion.features.cluster import check_sha256, connect, run_sharded, worker_state


def predict_on_cluster(scheduler: str, bundle_dir: str | Path, paths: Sequence[str], batch_size: int = 32):
    """Positive-class probabilities of `paths`, in order, from the bundle at `bundle_dir` run by the workers."""
    folder = Path(bundle_dir).resolve()
    expected = (str(folder), file_sha256(folder / MANIFEST))
    with connect(scheduler) as client:
        done = run_sharded(client, predict_shard, expected, paths, batch_size)
    return np.concatenate([prob for _, prob in done])


# --- worker ---------------------------------------------------------------------------------------------------------


def predict_shard(expected: tuple[str, str], index: int, paths: list[str]) -> np.ndarray:
    """Probabilities of one shard from the bundle this worker keeps (loaded and manifest-checked once)."""
    state = worker_state()
    if state.bundle is None or state.bundle[0] != expected:
        state.bundle = (expected, _checked_bundle(*expected))
    return state.bundle[1].predict_paths(paths)


def _checked_bundle(folder: str, manifest_sha256: str) -> Bundle:
    bundle = load_bundle(folder)
    check_sha256(str(Path(folder) / MANIFEST), file_sha256(Path(folder) / MANIFEST), manifest_sha256)
    return bundle
