"""How one backbone runs over image files: the engine (ONNX Runtime graph or Keras sub-model) and flip averaging
assembled into a runner (`assemble_runner`), and `FeatureExtractor`, which keeps a process's (or a cluster worker's)
runners. `tlfusion.features.extraction` adds the on-disk cache and the cluster dispatch on top.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from tlfusion.backbones.registry import feature_model
from tlfusion.data.images import decoded_batches
from tlfusion.errors import InputError
from tlfusion.features.onnx_graphs import BatchRunner, cached_onnx_graph, onnx_runner
from tlfusion.features.source import ModelSource

logger = logging.getLogger(__name__)

PROGRESS_MIN_IMAGES = 128


Runner = tuple[BatchRunner, int]
"""A batch runner images [n, s, s, 1] -> features [n, d], and the input size s it takes."""


class FeatureExtractor:
    """Runs feature sub-models over image files, keeping the `capacity` most recently used runners, so that a
    process (or each cluster worker, `tlfusion.features.cluster`) converts or traces a model once."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._runners: OrderedDict[tuple[str, str], Runner] = OrderedDict()
        self._lock = threading.Lock()

    def runner(self, key: tuple[str, str], build: Callable[[], Runner]) -> Runner:
        """The runner kept under `key` ((model key, engine)), made by `build()` on first use."""
        with self._lock:
            if key not in self._runners:
                self._runners[key] = build()
                while len(self._runners) > self.capacity:
                    self._runners.popitem(last=False)
            self._runners.move_to_end(key)
            return self._runners[key]

    def extract(
        self,
        key: tuple[str, str],
        build: Callable[[], Runner],
        paths: Sequence[str],
        image_size: int,
        clahe: bool,
        batch_size: int,
        progress: bool = False,
    ) -> np.ndarray:
        """Features [n, d] (float32) of every image at `paths`, in order, through the runner under `key`."""
        run_batch, input_size = self.runner(key, build)
        if input_size != image_size:
            raise InputError(f"image size {image_size} differs from the model's {input_size}")
        outputs = []
        with _progress_bar(len(paths), progress) as advance:
            for batch in decoded_batches(paths, image_size, clahe, batch_size):
                outputs.append(run_batch(batch))
                advance(len(batch))
        return np.concatenate(outputs).astype(np.float32, copy=False)


@dataclass(frozen=True)
class ExtractionJob:
    """The images one model runs over and how: what `extraction.compute_in_process` and `cluster.extract_on_cluster`
    take. `cache_dir` (None without a cache) holds the ONNX graphs and the models cluster workers load."""

    source: ModelSource
    paths: list[str]
    image_size: int
    clahe: bool
    batch_size: int
    engine: str
    cache_dir: Path | None


def new_runner(source: ModelSource, engine: str, cache_dir: Path | None) -> Runner:
    """The runner of `source` with `engine` (its ONNX graph converted or read from `cache_dir`, or Keras)."""
    graph = engine_graph(source, engine, cache_dir)
    return assemble_runner(graph, None if graph is not None else source.model, source.stages, source.flip)


def assemble_runner(graph: bytes | None, model: keras.Model | None, stages: int = 1, flip: bool = False) -> Runner:
    """The one way a backbone becomes a runner (extraction, the bundle, cluster workers): the ONNX `graph` when
    given, else the Keras feature sub-model of `model` pooling `stages` stages; flip-averaged when `flip`."""
    run_batch, size = onnx_runner(graph) if graph is not None else keras_runner(model, stages)
    return (flip_averaged(run_batch) if flip else run_batch), size


def flip_averaged(run_batch: BatchRunner) -> BatchRunner:
    """A runner whose features are the mean of each image's and its left-right mirror's (images [n, s, s, 1])."""
    return lambda batch: (run_batch(batch) + run_batch(np.ascontiguousarray(batch[:, :, ::-1]))) / 2


def engine_graph(source: ModelSource, engine: str, cache_dir: Path | None) -> bytes | None:
    """The ONNX graph to extract with, or None for Keras: "keras" never converts, "onnx" raises when the conversion
    fails, "auto" then logs why and returns None."""
    if engine == "keras":
        return None
    try:
        return cached_onnx_graph(source, cache_dir)
    except Exception as error:
        if engine == "onnx":
            raise
        logger.warning("features: ONNX Runtime not used (%s: %s); extracting with Keras", type(error).__name__, error)
    return None


def keras_runner(model: keras.Model, stages: int = 1) -> tuple[BatchRunner, int]:
    """A runner images [n, s, s, 1] -> features [n, d] through the Keras feature sub-model, and its input size."""
    extractor = feature_model(model, stages)
    return (lambda batch: np.asarray(extractor.predict_on_batch(batch))), int(model.input.shape[1])


@contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar for long extractions; yields `advance(n_images)`."""
    if not enabled or total < PROGRESS_MIN_IMAGES:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("extracting features"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("features", total=total)
        yield lambda n: bar.advance(task, n)
