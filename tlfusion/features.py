"""Penultimate-feature extraction with an on-disk cache, and `FeatureFusion`, the transformer over fused features.

`extract_features` decodes images one batch ahead (`decoded_batches`) and runs the backbone's feature sub-model with
ONNX Runtime (converted once with tf2onnx, `tlfusion.onnx_graphs`) or Keras. Features are cached on disk under a key
made of the model (file sha256 or weights hash) and the preprocessing (image size, CLAHE); inside it every image is
keyed by the sha256 of its file, so a re-run extracts only images it has not seen::

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
from numbers import Integral, Real
from pathlib import Path

import keras
import numpy as np
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler, normalize
from sklearn.utils.validation import check_is_fitted, validate_data

from tlfusion.data.images import file_sha256
from tlfusion.errors import InputError
from tlfusion.feature_cache import FeatureCache
from tlfusion.feature_runners import ExtractionJob, FeatureExtractor, ModelSource, new_runner

logger = logging.getLogger(__name__)

ENGINES = ("auto", "keras", "onnx")


def extract_features(
    model: keras.Model | str | Path,
    paths: Sequence[str | Path],
    image_size: int,
    clahe: bool = False,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    engine: str = "auto",
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
    (`tlfusion.backbones.feature_model`). With `scheduler` (a Dask scheduler address; needs `cache_dir`, a folder
    the workers share) the images to extract are sharded over the cluster's workers (`tlfusion.cluster`). With
    `flip`, each image's features are the mean of its own and its left-right mirror's (`flip_averaged`).
    """
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if not isinstance(batch_size, Integral) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}")
    paths = [str(path) for path in paths]
    if not paths:
        raise InputError("paths: no images to extract features from")
    if scheduler and cache_dir is None:
        raise InputError("scheduler: extraction on a cluster needs cache_dir, a folder the workers share")
    source = ModelSource(model, stages, flip)
    if cache_dir is None:
        return _compute(ExtractionJob(source, paths, image_size, clahe, batch_size, engine, None), progress)

    cache_dir = Path(cache_dir)
    hashes = [_image_sha256(path) for path in paths]
    cache = FeatureCache.open(cache_dir, source.features_key, image_size, clahe)
    known = cache.lookup(hashes)
    missing = {digest: path for digest, path in zip(hashes, paths, strict=True) if digest not in known}
    if missing:
        job = ExtractionJob(source, list(missing.values()), image_size, clahe, batch_size, engine, cache_dir)
        new = _compute_on_cluster(scheduler, job) if scheduler else _compute(job, progress)
        cache.append(list(missing), new)
        known.update(zip(missing, new, strict=True))
    logger.info("features: %d images, %d extracted, the rest from %s", len(paths), len(missing), cache.folder)
    widths = sorted({len(row) for row in known.values()})
    if len(widths) > 1:
        raise InputError(f"{cache.folder}: cached features of different widths {widths}; delete it to re-extract")
    return np.stack([known[digest] for digest in hashes]).astype(np.float32, copy=False)


def _image_sha256(path: str) -> str:
    try:
        return file_sha256(path)
    except OSError as error:
        raise InputError(f"{path}: cannot read image file ({error.strerror or error})") from None


EXTRACTOR = FeatureExtractor()
"""This process's extractor (`extract_features` without a scheduler)."""


def _compute(job: ExtractionJob, progress: bool) -> np.ndarray:
    """Run the model over `job.paths` in this process (every image here is sent to the model)."""
    build = partial(new_runner, job.source, job.engine, job.cache_dir)
    key = (job.source.features_key, job.engine)
    return EXTRACTOR.extract(key, build, job.paths, job.image_size, job.clahe, job.batch_size, progress)


def _compute_on_cluster(scheduler: str, job: ExtractionJob) -> np.ndarray:
    """`_compute`'s counterpart that shards the images over the Dask cluster at `scheduler`."""
    from tlfusion.cluster import extract_on_cluster

    return extract_on_cluster(scheduler, job)


def fuse(blocks: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Concatenate per-backbone feature blocks [n, d_i] into X [n, sum d_i] (float32) and the block sizes."""
    if len(blocks) == 0:
        raise InputError("fuse: no feature blocks given")
    arrays = [np.asarray(block, dtype=np.float32) for block in blocks]
    for i, array in enumerate(arrays):
        if array.ndim != 2:
            raise InputError(f"feature block {i} must be 2-D (images x features), got shape {array.shape}")
        if len(array) != len(arrays[0]):
            raise InputError(f"feature block {i} has {len(array)} rows but block 0 has {len(arrays[0])}")
    return np.hstack(arrays), [array.shape[1] for array in arrays]


class FeatureFusion(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Normalise concatenated per-backbone features, then optionally reduce them with PCA.

    Parameters
    ----------
    block_sizes : list of int or None
        Width of each backbone's block, in column order (as returned by `fuse`); None is one block.
    standardize : bool
        Z-score every feature with the training mean and standard deviation.
    l2 : bool
        Scale each block of each row to unit L2 norm (after standardising), so every backbone weighs the same
        whatever its width.
    pca : int, float or None
        Keep this many principal components (int >= 1) or enough to explain this variance fraction (0 < float < 1).

    Attributes
    ----------
    block_sizes_ : list of int
    scaler_ : StandardScaler or None
    pca_ : PCA or None
    n_features_in_ : int
    """

    def __init__(
        self,
        block_sizes: Sequence[int] | None = None,
        standardize: bool = True,
        l2: bool = False,
        pca: int | float | None = None,
    ):
        self.block_sizes = block_sizes
        self.standardize = standardize
        self.l2 = l2
        self.pca = pca

    def fit(self, X, y=None):
        """Learn the scaling (and PCA) from training features X [n, d]."""
        X = self._validate(X, reset=True)
        self.block_sizes_ = self._check_block_sizes(X.shape[1])
        self.scaler_ = StandardScaler().fit(X) if self.standardize else None
        self.pca_ = None
        if self.pca is not None:
            self.pca_ = PCA(self._check_pca(X.shape), svd_solver="full").fit(self._normalise(X))
        return self

    def transform(self, X):
        """Normalised (and PCA-reduced) features."""
        check_is_fitted(self)
        X = self._normalise(self._validate(X, reset=False))
        return X if self.pca_ is None else self.pca_.transform(X)

    def get_feature_names_out(self, input_features=None):
        """Input names without PCA; "pca0", "pca1", ... with it."""
        check_is_fitted(self)
        if self.pca_ is not None:
            return self.pca_.get_feature_names_out()
        return super().get_feature_names_out(input_features)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _validate(self, X, reset: bool) -> np.ndarray:
        X = validate_data(self, X, reset=reset, dtype=[np.float64, np.float32], ensure_all_finite=False)
        bad_rows = ~np.isfinite(X).all(axis=1)
        if bad_rows.any():
            raise InputError(f"features contain NaN or inf in {int(bad_rows.sum())} of {len(X)} rows")
        return X

    def _normalise(self, X: np.ndarray) -> np.ndarray:
        if self.scaler_ is not None:
            X = self.scaler_.transform(X)
        if self.l2:
            edges = np.cumsum(self.block_sizes_)[:-1]
            X = np.hstack([normalize(block) for block in np.split(X, edges, axis=1)])
        return X

    def _check_block_sizes(self, n_features: int) -> list[int]:
        if self.block_sizes is None:
            return [n_features]
        sizes = list(self.block_sizes)
        if not sizes or any(not isinstance(size, Integral) or size < 1 for size in sizes):
            raise InputError(f"block_sizes must be positive integers; got {sizes}")
        if sum(sizes) != n_features:
            raise InputError(f"block_sizes sum to {sum(sizes)} but the features have {n_features} columns")
        return [int(size) for size in sizes]

    def _check_pca(self, shape: tuple[int, int]) -> int | float:
        pca = self.pca
        if isinstance(pca, Integral) and not isinstance(pca, bool):
            if not 1 <= pca <= min(shape):
                raise InputError(f"pca={pca} components need at least that many rows and features; got {shape}")
            return int(pca)
        if isinstance(pca, Real) and not isinstance(pca, bool) and 0 < pca < 1:
            return float(pca)
        raise InputError(f"pca must be None, an integer >= 1 or a variance fraction in (0, 1); got {pca!r}")
