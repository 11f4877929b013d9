"""Out-of-distribution check: how far an image's features lie from the training images'.

The training split's backbone features (side by side, as the bundle's fusion step receives them) are standardised,
each feature's spread floored at `SPREAD_FLOOR` of the median feature's (features that barely vary in training,
numerical noise, would otherwise drown the rest), and summarised by their leading principal components. An image
has two distances from them: inside those components (Hotelling's T², each component scaled by its variance) and off
them (Q, the squared residual). Each is divided by its median over held-out training images and the larger one is
the image's distance; `FeatureDistance.score` divides it by the `QUANTILE` of the held-out distances, so a score
above 1 is further out than 99 % of the training images. The distance works before the fusion's L2 scaling or PCA,
which would hide how far out an image is.

Held out means patient-grouped folds, each scored by a standardisation and summary fitted on the other folds: a
summary's own images sit closer to it than new images do. A bundle stores the result in `ood.npz` (plain arrays,
read without pickles).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.model_selection import GroupKFold

from tlfusion.errors import InputError

QUANTILE = 0.99
MAX_COMPONENTS = 20
FOLDS = 5
MIN_IMAGES = 10
SPREAD_FLOOR = 0.01
_ARRAYS = ("center", "scale", "components", "variances", "scales", "limit", "quantile", "images")


@dataclass(frozen=True, eq=False)
class FeatureDistance:
    """The calibrated distance from the training features: their `center` and `scale` [d], orthonormal principal
    `components` [k, d] of the standardised features and their `variances` [k], the medians of held-out (T², Q)
    `scales` [2], and `limit`, the `quantile` of held-out distances over `images` training images."""

    center: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    scales: np.ndarray
    limit: float
    quantile: float
    images: int

    def score(self, X: np.ndarray) -> np.ndarray:
        """Each image's distance over the calibrated limit (> 1: beyond `quantile` of the training images), from its
        backbone features X [n, d]."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.center):
            raise InputError(
                f"out-of-distribution check: features of shape {X.shape}, expected [n, {len(self.center)}]"
            )
        statistics = _statistics((X - self.center) / self.scale, self.components, self.variances)
        return _distance(statistics, self.scales) / self.limit

    def save(self, path: Path) -> None:
        """Write the arrays to `path` as an uncompressed `.npz`."""
        with open(path, "wb") as file:
            np.savez(file, **{name: np.asarray(getattr(self, name)) for name in _ARRAYS})


def fit_feature_distance(X: np.ndarray, groups: np.ndarray) -> FeatureDistance | None:
    """Calibrate on the training split's backbone features X [n, d] of patients `groups`; None with fewer than
    `MIN_IMAGES` images or two patients."""
    X = np.asarray(X, dtype=np.float64)
    folds = min(FOLDS, len(set(groups)))
    if len(X) < MIN_IMAGES or folds < 2:
        return None
    held_out = np.zeros((len(X), 2))
    for fit, out in GroupKFold(n_splits=folds).split(X, groups=groups):
        center, scale, components, variances = _summary(X[fit])
        held_out[out] = _statistics((X[out] - center) / scale, components, variances)
    scales = np.array([_positive(float(np.median(column))) for column in held_out.T])
    limit = _positive(float(np.quantile(_distance(held_out, scales), QUANTILE)))
    return FeatureDistance(*_summary(X), scales, limit, QUANTILE, len(X))


def load_feature_distance(path: Path) -> FeatureDistance:
    """Read what `FeatureDistance.save` wrote, checking names, shapes and values (InputError naming `path`)."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            values = {name: arrays[name] for name in _ARRAYS}
    except (KeyError, ValueError, OSError) as error:
        raise InputError(f"{path}: not an out-of-distribution calibration ({error})") from None
    if not all(values[name].dtype.kind in "fi" for name in _ARRAYS):
        raise InputError(f"{path}: out-of-distribution arrays must be numbers")
    center, scale, components, variances, scales = (values[name].astype(np.float64) for name in _ARRAYS[:5])
    k, d = components.shape if components.ndim == 2 else (-1, -1)
    shapes = [a.shape for a in (center, scale, variances, scales)] + [values[name].shape for name in _ARRAYS[5:]]
    if shapes != [(d,), (d,), (k,), (2,), (), (), ()]:
        raise InputError(f"{path}: out-of-distribution arrays of the wrong shapes")
    limit, quantile, images = (float(values[name]) for name in _ARRAYS[5:])
    finite = all(np.isfinite(a).all() for a in (center, scale, components, variances, scales, limit))
    positive = all((a > 0).all() for a in (scale, variances, scales)) and limit > 0
    if not (finite and positive and 0 < quantile < 1):
        raise InputError(f"{path}: out-of-distribution values out of range")
    return FeatureDistance(center, scale, components, variances, scales, limit, quantile, int(images))


def _summary(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Center and scale of X (the spread floored, see the module), and the leading principal components of the
    standardised X with their variances (floored, so that none divides by zero)."""
    center, spread = X.mean(axis=0), X.std(axis=0)
    varying = spread[spread > 0]
    scale = np.maximum(spread, SPREAD_FLOOR * float(np.median(varying)) if len(varying) else 1.0)
    k = min(MAX_COMPONENTS, len(X) - 1, X.shape[1])
    pca = PCA(n_components=k, random_state=0).fit((X - center) / scale)
    variances = np.maximum(pca.explained_variance_, 1e-12 * max(pca.explained_variance_.max(), 1.0))
    return center, scale, pca.components_, variances


def _statistics(Z: np.ndarray, components: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """[n, 2] for standardised features Z: T² (mean over components of the squared projection over its variance)
    and Q (the squared residual off the components)."""
    projected = Z @ components.T
    t2 = (projected**2 / variances).mean(axis=1)
    q = np.maximum((Z**2).sum(axis=1) - (projected**2).sum(axis=1), 0.0)
    return np.column_stack([t2, q if Z.shape[1] > len(variances) else np.zeros_like(t2)])


def _distance(statistics: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The larger of T² and Q, each over its held-out median."""
    return (statistics / scales).max(axis=1)


def _positive(value: float) -> float:
    """`value` if above 0, else 1 (a statistic that is 0 on every training image: Q with nothing left out)."""
    return value if value > 0 else 1.0
