"""Fused features: per-backbone blocks side by side (`fuse`), and `FeatureFusion`, the transformer over them."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler, normalize
from sklearn.utils.validation import check_is_fitted, validate_data

from tlfusion.errors import InputError


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

    def blocks(self, X) -> list[np.ndarray]:
        """The columns of X [n, d] (features, or a gradient over them) split into the per-backbone blocks."""
        return np.split(np.asarray(X), np.cumsum(self.block_sizes_)[:-1], axis=1)

    def backward(self, X, grad) -> np.ndarray:
        """d(score)/dX [n, d] at feature rows X of a score whose gradient with respect to `transform(X)` is `grad`
        ([k], the same for every row, or [n, k]): back through PCA, the block L2 and the standardisation."""
        check_is_fitted(self)
        X = np.asarray(X, np.float64)
        grad = np.broadcast_to(grad, (len(X), np.shape(grad)[-1])).copy()
        if self.pca_ is not None:
            grad = grad / np.sqrt(self.pca_.explained_variance_) if self.pca_.whiten else grad
            grad = grad @ self.pca_.components_
        scaled = self.scaler_.transform(X) if self.scaler_ is not None else X
        if self.l2:
            grad = np.hstack(
                [_through_unit_norm(v, g) for v, g in zip(self.blocks(scaled), self.blocks(grad), strict=True)]
            )
        return grad / self.scaler_.scale_ if self.scaler_ is not None else grad

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
            X = np.hstack([normalize(block) for block in self.blocks(X)])
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


def _through_unit_norm(v: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Gradient w.r.t. v of a score whose gradient w.r.t. u = v / |v| is g: (g - (g . u) u) / |v| per row."""
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    norm = np.where(norm > 0, norm, 1.0)
    u = v / norm
    return (g - np.sum(g * u, axis=1, keepdims=True) * u) / norm
