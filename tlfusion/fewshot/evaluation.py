"""Few-shot (n-way k-shot) evaluation on cached features: distance classifiers over episodes
(`tlfusion.fewshot.episodes`), mean and 95% CIs over patients (`tlfusion.fewshot.intervals`).

Question answered: "how well would a classifier on these features do with only K labelled patients per class?"
Each episode draws ``ways`` classes, ``shots`` support images per class (one per patient) and ``queries`` query
images per class (one per patient); support and query patients never overlap, so no patient is seen on both sides.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer
from threadpoolctl import ThreadpoolController

from tlfusion.errors import InputError
from tlfusion.fewshot.episodes import Episode, check_positive, sample_episodes
from tlfusion.fewshot.intervals import episode_membership, interval_note, score_summary
from tlfusion.fileio import write_atomic

_METRICS = ("euclidean", "cosine")
_KNN_WEIGHTS = ("uniform", "distance")
SUMMARY_KEYS = ("mean", "ci95", "episode_ci95", "episode_std")


# -------------------------------------------------------------------------------------------- classifiers


def _as_float(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise InputError(f"fewshot: features must be a 2-D matrix, got shape {X.shape}")
    return X


def _l2_normalize(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, np.finfo(X.dtype).tiny)


def _euclidean(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    squared = (A * A).sum(1)[:, None] - 2.0 * A @ B.T + (B * B).sum(1)[None, :]
    return np.sqrt(np.maximum(squared, 0.0))


def _class_means(X: np.ndarray, y_idx: np.ndarray, n_classes: int) -> np.ndarray:
    one_hot = np.zeros((n_classes, len(y_idx)))
    one_hot[y_idx, np.arange(len(y_idx))] = 1.0
    return (one_hot @ X) / one_hot.sum(1, keepdims=True)


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax that keeps the top class's log-probability below 0 (log1p), so ranks stay untied
    even where plain softmax would round to exactly 1.0."""
    rows = np.arange(len(scores))
    top = scores.argmax(axis=1)
    shifted = scores - scores[rows, top][:, None]
    others = np.exp(shifted)
    others[rows, top] = 0.0
    return shifted - np.log1p(others.sum(axis=1, keepdims=True))


class _FewShotClassifierMixin(ClassifierMixin):
    """predict / predict_proba from ``predict_log_proba`` and ``classes_``."""

    def predict_proba(self, X) -> np.ndarray:
        return np.exp(self.predict_log_proba(X))

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_log_proba(X).argmax(axis=1)]


class PrototypeClassifier(_FewShotClassifierMixin, BaseEstimator):
    """Nearest class centroid (Snell et al. 2017 prototypes); probabilities are a softmax over negative distances.

    ``metric="cosine"`` L2-normalises supports and queries first and uses cosine distance.
    """

    def __init__(self, metric: str = "euclidean"):
        self.metric = metric

    def fit(self, X, y) -> PrototypeClassifier:
        if self.metric not in _METRICS:
            raise InputError(f"fewshot: metric={self.metric!r} must be one of {list(_METRICS)}")
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        self.centroids_ = _class_means(self._embed(_as_float(X)), y_idx, len(self.classes_))
        return self

    def _embed(self, X: np.ndarray) -> np.ndarray:
        return _l2_normalize(X) if self.metric == "cosine" else X

    def predict_log_proba(self, X) -> np.ndarray:
        queries = self._embed(_as_float(X))
        if self.metric == "cosine":
            distances = 1.0 - queries @ _l2_normalize(self.centroids_).T
        else:
            distances = _euclidean(queries, self.centroids_)
        return _log_softmax(-distances)


class SimpleShotClassifier(_FewShotClassifierMixin, BaseEstimator):
    """SimpleShot (Wang et al. 2019, "CL2N"): centre on a base mean, L2-normalise, nearest centroid.

    ``base_mean`` is the mean feature vector of a base set (see ``from_base_set``); when None, each fit centres
    on the mean of its own supports (no query or test information is used).
    """

    def __init__(self, base_mean: np.ndarray | None = None):
        self.base_mean = base_mean

    @classmethod
    def from_base_set(cls, X_base) -> SimpleShotClassifier:
        """A SimpleShot classifier centred on the mean of the base-set features ``X_base``."""
        X_base = _as_float(X_base)
        if len(X_base) == 0 or not np.isfinite(X_base).all():
            raise InputError("fewshot: the SimpleShot base set must be non-empty and finite")
        return cls(base_mean=X_base.mean(axis=0))

    def fit(self, X, y) -> SimpleShotClassifier:
        X = _as_float(X)
        if self.base_mean is None:
            self.mean_ = X.mean(axis=0)
        else:
            self.mean_ = np.asarray(self.base_mean, dtype=np.float64)
            if self.mean_.shape != (X.shape[1],):
                raise InputError(f"fewshot: base_mean has shape {self.mean_.shape}, features have {X.shape[1]} columns")
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        self.centroids_ = _class_means(self._embed(X), y_idx, len(self.classes_))
        return self

    def _embed(self, X: np.ndarray) -> np.ndarray:
        return _l2_normalize(X - self.mean_)

    def predict_log_proba(self, X) -> np.ndarray:
        return _log_softmax(-_euclidean(self._embed(_as_float(X)), self.centroids_))


class KNNFewShotClassifier(_FewShotClassifierMixin, BaseEstimator):
    """k nearest supports (k capped at the number of supports); probabilities are the neighbours' vote shares,
    weighted by inverse distance when ``weights="distance"``."""

    def __init__(self, n_neighbors: int = 5, weights: str = "distance"):
        self.n_neighbors = n_neighbors
        self.weights = weights

    def fit(self, X, y) -> KNNFewShotClassifier:
        if self.weights not in _KNN_WEIGHTS:
            raise InputError(f"fewshot: weights={self.weights!r} must be one of {list(_KNN_WEIGHTS)}")
        check_positive(n_neighbors=self.n_neighbors)
        self.classes_, self.support_y_idx_ = np.unique(y, return_inverse=True)
        self.supports_ = _as_float(X)
        return self

    def predict_log_proba(self, X) -> np.ndarray:
        distances = _euclidean(_as_float(X), self.supports_)
        k = min(self.n_neighbors, distances.shape[1])
        nearest = np.argpartition(distances, k - 1, axis=1)[:, :k]
        near_distances = np.take_along_axis(distances, nearest, axis=1)
        if self.weights == "distance":
            votes = 1.0 / np.maximum(near_distances, np.finfo(np.float64).tiny)
        else:
            votes = np.ones_like(near_distances)
        tally = np.zeros((len(distances), len(self.classes_)))
        np.add.at(tally, (np.arange(len(distances))[:, None], self.support_y_idx_[nearest]), votes)
        with np.errstate(divide="ignore"):
            return np.log(tally / tally.sum(axis=1, keepdims=True))


def _logistic(base_mean: np.ndarray | None) -> BaseEstimator:
    return make_pipeline(Normalizer(), LogisticRegression(max_iter=1000))


FEWSHOT_CLASSIFIERS: dict[str, Callable[[np.ndarray | None], BaseEstimator]] = {
    "prototype": lambda base_mean: PrototypeClassifier(),
    "prototype_cosine": lambda base_mean: PrototypeClassifier(metric="cosine"),
    "knn": lambda base_mean: KNNFewShotClassifier(),
    "simpleshot": lambda base_mean: SimpleShotClassifier(base_mean=base_mean),
    "logistic": _logistic,
}


def make_fewshot_classifier(name: str, base_mean: np.ndarray | None = None) -> BaseEstimator:
    """A fresh few-shot classifier by registry name; ``base_mean`` is used by ``simpleshot`` only."""
    if name not in FEWSHOT_CLASSIFIERS:
        raise InputError(f"fewshot: unknown classifier {name!r}; choose from {sorted(FEWSHOT_CLASSIFIERS)}")
    return FEWSHOT_CLASSIFIERS[name](base_mean)


# --------------------------------------------------------------------------------------------- evaluation


def _check_features(X, y) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
        raise InputError(f"fewshot: features must be a numeric 2-D matrix, got {X.dtype} of shape {X.shape}")
    if len(y) != len(X):
        raise InputError(f"fewshot: {len(X)} feature rows but {len(y)} labels")
    if not np.isfinite(X).all():
        raise InputError(f"fewshot: features contain NaN or inf in {int((~np.isfinite(X)).any(1).sum())} rows")
    return X, y


def _episode_auroc(log_proba: np.ndarray, y_idx: np.ndarray) -> float:
    """Binary AUROC of the second class for 2 classes, else macro one-vs-rest AUROC (ties count one half)."""
    if log_proba.shape[1] == 2:
        scores, positive = log_proba[:, 1:], (y_idx == 1)[:, None]
    else:
        scores, positive = log_proba, y_idx[:, None] == np.arange(log_proba.shape[1])
    left, right = scores[:, None, :], scores[None, :, :]
    wins = (left > right) + 0.5 * (left == right)
    pairs = positive[:, None, :] & ~positive[None, :, :]
    return float(((wins * pairs).sum((0, 1)) / pairs.sum((0, 1))).mean())


@cache
def _threadpools() -> ThreadpoolController:
    """The process's BLAS/OpenMP pools, looked up once (a fresh lookup costs milliseconds)."""
    return ThreadpoolController()


def evaluate_episodes(
    X, y, episodes: Sequence[Episode], classifier: str | BaseEstimator, groups: Sequence | None = None
) -> dict:
    """Fit ``classifier`` (a registry name or an unfitted estimator, cloned here) on each episode's supports
    and score its queries: AUROC and accuracy per episode and their summary (`fewshot.intervals.score_summary`):
    the mean, the patient-level ``ci95`` when ``groups`` (one patient id per row) is given, else None, the
    episode-only ``episode_ci95`` (mean ± 1.96·std/√E) and the per-episode spread."""
    X, y = _check_features(X, y)
    if groups is not None and len(groups) != len(y):
        raise InputError(f"fewshot: {len(y)} labels but {len(groups)} patient groups")
    if len(episodes) < 2:
        raise InputError(f"fewshot: {len(episodes)} episode(s); at least 2 are needed for a confidence interval")
    estimator = clone(make_fewshot_classifier(classifier) if isinstance(classifier, str) else classifier)
    aurocs, accuracies = [], []
    with _threadpools().limit(limits=1, user_api="blas"):  # episodes are tiny: extra BLAS threads only spin
        for episode in episodes:
            estimator.fit(X[episode.support_idx], y[episode.support_idx])
            query_y = y[episode.query_idx]
            y_idx = np.searchsorted(estimator.classes_, query_y).clip(0, len(estimator.classes_) - 1)
            if not (estimator.classes_[y_idx] == query_y).all():
                raise InputError("fewshot: an episode has query labels that none of its supports carry")
            log_proba = estimator.predict_log_proba(X[episode.query_idx])
            aurocs.append(_episode_auroc(log_proba, y_idx))
            accuracies.append(float((log_proba.argmax(axis=1) == y_idx).mean()))
    membership = None if groups is None else episode_membership(episodes, groups)
    return {"auroc": score_summary(aurocs, membership), "accuracy": score_summary(accuracies, membership)}


def run_fewshot(
    X,
    y,
    groups,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    classifier: str,
    seed: int = 0,
    base_mean: np.ndarray | None = None,
) -> dict:
    """Sample episodes, evaluate one registry classifier on them and return the ``fewshot.json`` record."""
    X, y = _check_features(X, y)
    estimator = make_fewshot_classifier(classifier, base_mean=base_mean)
    sampled = sample_episodes(y, groups, ways, shots, queries, episodes, seed=seed)
    scores = evaluate_episodes(X, y, sampled, estimator, groups=groups)
    groups = np.asarray(groups)
    per_class = {
        str(label): {"images": int((y == label).sum()), "patients": len(np.unique(groups[y == label]))}
        for label in np.unique(y)
    }
    return {
        "ways": ways,
        "shots": shots,
        "queries": queries,
        "episodes": episodes,
        "classifier": classifier,
        "seed": seed,
        "auroc": {key: scores["auroc"][key] for key in SUMMARY_KEYS},
        "accuracy": {key: scores["accuracy"][key] for key in SUMMARY_KEYS},
        "per_class": per_class,
        "interval": interval_note(episode_membership(sampled, groups)),
    }


def shots_curve(
    X,
    y,
    groups,
    shots_list: Sequence[int] = (1, 5, 10, 20),
    ways: int = 2,
    queries: int = 15,
    episodes: int = 600,
    classifiers: Sequence[str] = ("prototype",),
    seed: int = 0,
    base_mean: np.ndarray | None = None,
) -> list[dict]:
    """``run_fewshot`` for every (shots, classifier) pair; classifiers at the same shots see the same episodes."""
    return [
        run_fewshot(X, y, groups, ways, shots, queries, episodes, name, seed=seed, base_mean=base_mean)
        for shots in shots_list
        for name in classifiers
    ]


def plot_shots_curve(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """AUROC against shots with patient-level 95% CI error bars, one line per classifier, written atomically as a
    PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise InputError("fewshot: no shots-curve rows to plot")
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name in dict.fromkeys(row["classifier"] for row in rows):
        line = sorted((row for row in rows if row["classifier"] == name), key=lambda row: row["shots"])
        shots = [row["shots"] for row in line]
        means = np.array([row["auroc"]["mean"] for row in line])
        bounds = np.array([row["auroc"]["ci95"] or [np.nan, np.nan] for row in line], dtype=np.float64)
        errors = np.abs(bounds.T - means)  # no bar where the patient interval is not estimable
        axes.errorbar(shots, means, yerr=errors, marker="o", capsize=3, label=name)
    ways = sorted({row["ways"] for row in rows})
    axes.set(xlabel="shots per class", ylabel="AUROC (95% CI over patients)", title=f"{'/'.join(map(str, ways))}-way")
    axes.set_xticks(sorted({row["shots"] for row in rows}))
    axes.legend()
    return write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=120))
