"""Penultimate-feature extraction with an on-disk cache.

`extract_features` decodes images one batch ahead (`decoded_batches`) and runs the backbone's feature sub-model with
ONNX Runtime (converted once with tf2onnx, `tlfusion.features.onnx_graphs`) or Keras. Features are cached on disk under
a key made of the model (file sha256 or weights hash) and the preprocessing (image size, CLAHE); inside it every image
is keyed by the sha256 of its file, so a re-run extracts only images it has not seen::

    cache_dir/
      onnx/<model key>.onnx            converted feature sub-model (checked against Keras when written)
      onnx/<model key>.onnx.sha256     its sha256, written after it: a graph without it or not matching it is
                                       converted again
      <cache key>/key.json             what the key stands for (model, image size, clahe, format)
      <cache key>/chunk-<id>.npy       float32 [k, d] features of one extraction
      <cache key>/chunk-<id>.txt       the k image sha256s, one a line; written last, so it commits the chunk
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from numbers import Integral
from pathlib import Path
from typing import Literal, get_args

import keras
import numpy as np

from tlfusion.data.images import file_sha256
from tlfusion.errors import InputError
from tlfusion.features.cache import FeatureCache
from tlfusion.features.runners import ExtractionJob, FeatureExtractor, new_runner
from tlfusion.features.source import ModelSource

logger = logging.getLogger(__name__)

Engine = Literal["auto", "keras", "onnx"]
ENGINES: tuple[Engine, ...] = get_args(Engine)


def extract_features(
    model: keras.Model | str | Path,
    paths: Sequence[str | Path],
    image_size: int,
    clahe: bool = False,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    engine: Engine = "auto",
    progress: bool = True,
    stages: int = 1,
    scheduler: str | None = None,
    flip: bool = False,
) -> np.ndarray:
    """Pooled penultimate features [n, d] (float32) of the images at `paths`, in order.

    `model` is a tlfusion backbone or its `.keras` file. With `cache_dir`, features already cached for the same
    model, preprocessing and image content are read back and only the other images are extracted (each distinct
    image content once). `engine` "auto" runs ONNX Runtime when the conversion succeeds and Keras otherwise
    (the reason is logged); "onnx" and "keras" force one. `stages` > 1 gives multi-scale features
    (`tlfusion.backbones.registry.feature_model`). With `scheduler` (a Dask scheduler address; needs `cache_dir`, a
    folder the workers share) the images to extract are sharded over the cluster's workers
    (`tlfusion.features.cluster`). With `flip`, each image's features are the mean of its own and its left-right
    mirror's (`flip_averaged`).
    """
    paths = _checked_arguments(paths, engine, batch_size, scheduler, cache_dir)
    source = ModelSource(model, stages, flip)
    if cache_dir is None:
        return compute_in_process(ExtractionJob(source, paths, image_size, clahe, batch_size, engine, None), progress)

    cache_dir = Path(cache_dir)
    hashes = [_image_sha256(path) for path in paths]
    cache = FeatureCache.open(cache_dir, source.features_key, image_size, clahe)
    known = cache.lookup(hashes)
    missing = {digest: path for digest, path in zip(hashes, paths, strict=True) if digest not in known}
    if missing:
        job = ExtractionJob(source, list(missing.values()), image_size, clahe, batch_size, engine, cache_dir)
        new = _compute_on_cluster(scheduler, job) if scheduler else compute_in_process(job, progress)
        cache.append(list(missing), new)
        known.update(zip(missing, new, strict=True))
    logger.info("features: %d images, %d extracted, the rest from %s", len(paths), len(missing), cache.folder)
    widths = sorted({len(row) for row in known.values()})
    if len(widths) > 1:
        raise InputError(f"{cache.folder}: cached features of different widths {widths}; delete it to re-extract")
    return np.stack([known[digest] for digest in hashes]).astype(np.float32, copy=False)


def _checked_arguments(paths, engine: str, batch_size: int, scheduler: str | None, cache_dir) -> list[str]:
    """`paths` as text, after checking the engine, batch size and that a cluster has a cache folder to share."""
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if not isinstance(batch_size, Integral) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}")
    paths = [str(path) for path in paths]
    if not paths:
        raise InputError("paths: no images to extract features from")
    if scheduler and cache_dir is None:
        raise InputError("scheduler: extraction on a cluster needs cache_dir, a folder the workers share")
    return paths


def _image_sha256(path: str) -> str:
    try:
        return file_sha256(path)
    except OSError as error:
        raise InputError(f"{path}: cannot read image file ({error.strerror or error})") from None


EXTRACTOR = FeatureExtractor()
"""This process's extractor (`extract_features` without a scheduler)."""


def compute_in_process(job: ExtractionJob, progress: bool) -> np.ndarray:
    """Run the model over `job.paths` in this process (every image here is sent to the model)."""
    build = partial(new_runner, job.source, job.engine, job.cache_dir)
    key = (job.source.features_key, job.engine)
    return EXTRACTOR.extract(key, build, job.paths, job.image_size, job.clahe, job.batch_size, progress)


def _compute_on_cluster(scheduler: str, job: ExtractionJob) -> np.ndarray:
    """`compute_in_process`'s counterpart that shards the images over the Dask cluster at `scheduler`."""
    from tlfusion.features.cluster import extract_on_cluster

    return extract_on_cluster(scheduler, job)
