"""Feature extraction sharded over a Dask distributed cluster (`--scheduler tcp://HOST:8786`).

The driver (the `tlfusion` process) splits the image list into shards and submits one task per shard. Every worker
holds a `WorkerState` (a Dask worker plugin): its own `FeatureExtractor` and the last bundle it loaded, so a worker
loads a backbone or bundle once however many shards it runs. Workers must see the same files as the driver at the
same paths (images, run folder, bundle: a shared file system).

Extraction: the driver converts the feature sub-model once (ONNX, checked against Keras) or saves the Keras model
under the feature cache, and sends its path and sha256; a worker refuses a file whose sha256 differs, runs its shard
and writes the features to `<cache>/.shards.<id>.partial/shard-<i>.npy` (atomically). The driver reads the shards in
order, appends them to the cache as one chunk (the layout of a local run) and removes the staging folder. A worker
that dies mid-shard is replaced by its nanny and Dask re-runs the shard elsewhere (up to
`distributed.scheduler.allowed-failures` times); what it left is only ever inside the staging folder.

Prediction (`tlfusion.bundle.cluster_predict`) runs on the same connection, shards and worker state.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tlfusion.backbones.registry import load_model_file
from tlfusion.data.images import file_sha256
from tlfusion.errors import InputError
from tlfusion.features.cache import npy_bytes
from tlfusion.features.onnx_graphs import onnx_cache_path
from tlfusion.features.runners import ExtractionJob, FeatureExtractor, Runner, assemble_runner, engine_graph
from tlfusion.features.source import ModelSource, flipped_key
from tlfusion.fileio import write_atomic, write_bytes

try:
    from distributed import Client, WorkerPlugin, get_worker
except ImportError as error:  # an optional extra: the message names it wherever a scheduler was asked for
    raise InputError("--scheduler needs Dask distributed: pip install 'tlfusion[cluster]'") from error

logger = logging.getLogger(__name__)

PLUGIN = "tlfusion"
SHARDS_PER_THREAD = 2
"""Shards per worker thread: more shards than threads balance uneven workers and make a re-run shard cheap."""
CONNECT_TIMEOUT_S = 30


@dataclass(frozen=True)
class ShardJob:
    """What every extraction shard shares: the model file (`kind` "onnx" or "keras"), how to decode images and
    whether features are flip-averaged."""

    kind: Literal["onnx", "keras"]
    model_file: str
    model_sha256: str
    stages: int
    flip: bool
    image_size: int
    clahe: bool
    batch_size: int
    staging: str


class WorkerState(WorkerPlugin):
    """Per worker (a Dask worker plugin): an extractor and the last bundle loaded, kept while the worker lives."""

    name = PLUGIN
    idempotent = True  # registering again (every job does) keeps the loaded models

    def setup(self, worker: Any) -> None:
        self.extractor = FeatureExtractor()
        self.bundle: tuple[tuple[str, str], Any] | None = None

    def teardown(self, worker: Any) -> None:
        self.bundle = None


# --- driver -----------------------------------------------------------------------------------------------------


@contextmanager
def connect(scheduler: str) -> Iterator[Any]:
    """A Dask client on the scheduler at `scheduler` with `WorkerState` registered; bad addresses -> InputError."""
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"scheduler {scheduler}: cannot connect ({error})") from None
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
    except TimeoutError:
        client.close()
        raise InputError(f"scheduler {scheduler}: no worker joined within {CONNECT_TIMEOUT_S} s") from None
    try:
        client.register_plugin(WorkerState())
        yield client
    finally:
        client.close()


def shards(paths: Sequence[str], threads: int, batch_size: int) -> list[list[str]]:
    """`paths` in order, cut into about `SHARDS_PER_THREAD` shards per thread, each a whole number of batches: the
    workers then run exactly the batches a local run would, and give the same features."""
    batches = math.ceil(len(paths) / batch_size)
    size = batch_size * max(1, math.ceil(batches / max(1, SHARDS_PER_THREAD * threads)))
    return [list(paths[i : i + size]) for i in range(0, len(paths), size)]


def run_sharded(client: Any, task: Callable[..., Any], first: Any, paths: Sequence[str], batch_size: int) -> list:
    """`task(first, index, shard)` for every shard of `paths` on the cluster; the results in shard order."""
    threads = sum(client.nthreads().values())
    parts = shards(paths, threads, batch_size)
    logger.info("cluster: %d images in %d shards over %d worker threads", len(paths), len(parts), threads)
    futures = [client.submit(task, first, i, part, pure=False) for i, part in enumerate(parts)]
    return list(zip(parts, client.gather(futures), strict=True))


def extract_on_cluster(scheduler: str, job: ExtractionJob) -> np.ndarray:
    """Features [n, d] (float32) of `job.paths`, in order, extracted by the cluster's workers (`extract_features`
    with a scheduler; `job.cache_dir`, a folder the workers share, is required)."""
    source, cache_dir = job.source, job.cache_dir
    kind, model_file = _model_file(source, job.engine, cache_dir)
    staging = cache_dir.resolve() / f".shards.{uuid.uuid4().hex}.partial"
    model = (kind, str(model_file.resolve()), file_sha256(model_file))
    shard_job = ShardJob(*model, source.stages, source.flip, job.image_size, job.clahe, job.batch_size, str(staging))
    try:
        with connect(scheduler) as client:
            done = run_sharded(client, extract_shard, shard_job, job.paths, job.batch_size)
        return np.concatenate([_read_shard(Path(file), len(part)) for part, file in done])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _model_file(source: ModelSource, engine: str, cache_dir: Path) -> tuple[str, Path]:
    """The file the workers load: the ONNX graph converted here once (engine permitting), else the Keras model
    (its own file, or saved under `cache_dir/models/`)."""
    if engine_graph(source, engine, cache_dir) is not None:
        return "onnx", onnx_cache_path(cache_dir, source.key)
    if source.path is not None:
        return "keras", source.path
    path = cache_dir / "models" / f"{source.key}.keras"
    if not path.is_file():
        write_atomic(path, source.model.save)
    return "keras", path


def _read_shard(path: Path, rows: int) -> np.ndarray:
    features = np.load(path, allow_pickle=False)
    if features.ndim != 2 or len(features) != rows:
        raise RuntimeError(f"{path}: shard features of shape {features.shape}, expected {rows} rows")
    return features


# --- worker -----------------------------------------------------------------------------------------------------


def worker_state() -> WorkerState:
    return get_worker().plugins[PLUGIN]


def extract_shard(job: ShardJob, index: int, paths: list[str]) -> str:
    """Run one shard on this worker and write its features to the staging folder; returns the file written."""
    build = _loader(job)
    features = worker_state().extractor.extract(
        (flipped_key(job.model_sha256, job.flip), job.kind), build, paths, job.image_size, job.clahe, job.batch_size
    )
    path = Path(job.staging) / f"shard-{index:05d}.npy"
    write_bytes(path, npy_bytes(features))
    return str(path)


def _loader(job: ShardJob) -> Callable[[], Runner]:
    """Builds the shard's runner from the model file, once its sha256 is the one the driver sent."""

    def build() -> Runner:
        if job.kind == "onnx":
            graph = Path(job.model_file).read_bytes()
            check_sha256(job.model_file, hashlib.sha256(graph).hexdigest(), job.model_sha256)
            return assemble_runner(graph, None, job.stages, job.flip)
        check_sha256(job.model_file, file_sha256(job.model_file), job.model_sha256)
        return assemble_runner(None, load_model_file(job.model_file), job.stages, job.flip)

    return build


def check_sha256(path: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise InputError(f"{path}: sha256 {actual[:16]}… differs from the {expected[:16]}… the driver checked")
