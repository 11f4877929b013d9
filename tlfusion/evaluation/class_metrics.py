"""K-class metrics (K >= 3): accuracy, balanced accuracy, macro-F1, Cohen's kappa (unweighted and quadratic), macro
one-vs-rest AUROC, per-class sensitivity / specificity / F1 / AUROC and the K x K confusion matrix; for ordered
classes, the AUROC of each cut point (grade >= c scored by P(grade >= c), e.g. knee KL >= 2).

Like `tlfusion.evaluation.metrics`, every metric is computed from weighted confusion counts, so the point estimate and
the resamples of `metrics.bootstrap_statistics` (the one patient bootstrap) go through the same code. Predictions are
the most probable class. Undefined values are ``None`` (NaN inside the bootstrap).
"""

from __future__ import annotations

import numpy as np

from tlfusion.config.names import CLASS_METRICS  # headline metrics of a K-class result row
from tlfusion.errors import InputError
from tlfusion.evaluation.metrics import bootstrap_statistics, check_scores, weighted_auroc

PER_CLASS_METRICS = ("sensitivity", "specificity", "f1", "auroc")
"""Metrics of each class against the rest."""
_SEPARATOR = "|"  # per-class statistics are named "<metric>|<class index>" inside the bootstrap


def check_class_inputs(y_true, prob) -> tuple[np.ndarray, np.ndarray]:
    """Codes 0..K-1 [n] and probabilities [n, K] (K >= 3), or InputError."""
    P = check_scores(prob, "prob")
    y = np.asarray(y_true)
    if P.ndim != 2 or P.shape[1] < 3 or len(P) != len(y) or y.ndim != 1:
        raise InputError(f"prob must be [n, K >= 3] with one row per label; got {P.shape} for {y.shape} labels")
    if y.size == 0:
        raise InputError("y_true is empty")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= P.shape[1]:
        raise InputError(f"y_true must hold class codes 0..{P.shape[1] - 1}")
    return y.astype(np.int64), P


def class_metrics(y_true, prob, class_names: list[str]) -> dict:
    """One result row: `n`, every `CLASS_METRICS` value, `confusion` (rows true, columns predicted, in
    `class_names` order) and `per_class` (one entry per class with its `n` and `PER_CLASS_METRICS`)."""
    y, P = check_class_inputs(y_true, prob)
    _check_names(class_names, P)
    table = _class_table(y, P, np.ones((1, len(y))))
    K = P.shape[1]
    confusion = _confusion(y, P.argmax(axis=1), K, np.ones((1, len(y))))[0]
    return {
        "n": len(y),
        **{metric: _value(table[metric]) for metric in CLASS_METRICS},
        "confusion": confusion.astype(int).tolist(),
        "per_class": [
            {
                "class": name,
                "n": int((y == k).sum()),
                **{metric: _value(table[_key(metric, k)]) for metric in PER_CLASS_METRICS},
            }
            for k, name in enumerate(class_names)
        ],
    }


def class_bootstrap_ci(
    y_true, prob, groups, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[dict[str, list[float] | None], list[dict[str, list[float] | None]]]:
    """Patient-bootstrap percentile intervals (`metrics.bootstrap_statistics`): of each `CLASS_METRICS` value, and
    per class of each `PER_CLASS_METRICS` value."""
    y, P = check_class_inputs(y_true, prob)
    intervals = bootstrap_statistics(
        len(y), groups, lambda weights: _class_table(y, P, weights), n_boot=n_boot, seed=seed, level=level
    )
    per_class = [{metric: intervals[_key(metric, k)] for metric in PER_CLASS_METRICS} for k in range(P.shape[1])]
    return {metric: intervals[metric] for metric in CLASS_METRICS}, per_class


def paired_class_delta(
    y_true, prob_a, prob_b, groups, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, dict]:
    """Model A minus model B on the same items: each `CLASS_METRICS` difference and its paired patient-bootstrap
    interval (both scored on the same resamples)."""
    y, P_a = check_class_inputs(y_true, prob_a)
    _, P_b = check_class_inputs(y_true, prob_b)
    ones = np.ones((1, len(y)))
    observed_a, observed_b = _class_table(y, P_a, ones), _class_table(y, P_b, ones)

    def delta(weights: np.ndarray) -> dict[str, np.ndarray]:
        a, b = _class_table(y, P_a, weights), _class_table(y, P_b, weights)
        return {metric: a[metric] - b[metric] for metric in CLASS_METRICS}

    intervals = bootstrap_statistics(len(y), groups, delta, n_boot=n_boot, seed=seed, level=level)
    return {
        metric: {"delta": _value(observed_a[metric] - observed_b[metric]), "ci": intervals[metric]}
        for metric in CLASS_METRICS
    }


def cut_aurocs(y_true, prob, class_names: list[str]) -> list[dict]:
    """Ordered classes: one entry per cut point c (every class but the first) with its `cut` (the class name),
    `positives` (images of grade >= c) and `auroc` of grade >= c scored by P(grade >= c), the sum of the
    probabilities of c and above."""
    y, P = check_class_inputs(y_true, prob)
    _check_names(class_names, P)
    table = _cut_table(y, P, np.ones((1, len(y))))
    return [
        {"cut": class_names[k], "positives": int((y >= k).sum()), "auroc": _value(table[_key("auroc", k)])}
        for k in range(1, P.shape[1])
    ]


def cut_auroc_ci(
    y_true, prob, groups, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> list[list[float] | None]:
    """Patient-bootstrap percentile interval (`metrics.bootstrap_statistics`) of each `cut_aurocs` value, in order."""
    y, P = check_class_inputs(y_true, prob)
    intervals = bootstrap_statistics(
        len(y), groups, lambda weights: _cut_table(y, P, weights), n_boot=n_boot, seed=seed, level=level
    )
    return [intervals[_key("auroc", k)] for k in range(1, P.shape[1])]


def class_score(y_true, prob, scoring: str) -> float | None:
    """One `CLASS_METRICS` value (the CV selection score)."""
    y, P = check_class_inputs(y_true, prob)
    if scoring not in CLASS_METRICS:
        raise InputError(f"scoring must be one of {', '.join(CLASS_METRICS)}; got {scoring!r}")
    return _value(_class_table(y, P, np.ones((1, len(y))))[scoring])


def _check_names(class_names: list[str], P: np.ndarray) -> None:
    if len(class_names) != P.shape[1]:
        raise InputError(f"{len(class_names)} class names for {P.shape[1]} probability columns")


def _key(metric: str, k: int) -> str:
    return f"{metric}{_SEPARATOR}{k}"


def _confusion(y: np.ndarray, predicted: np.ndarray, K: int, weights: np.ndarray) -> np.ndarray:
    """Weighted confusion counts [resamples, K, K]: rows true class, columns predicted class."""
    cells = np.zeros((len(y), K * K))
    cells[np.arange(len(y)), y * K + predicted] = 1.0
    return (weights @ cells).reshape(len(weights), K, K)


def _class_table(y: np.ndarray, P: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for each row of `weights` (resamples x items): `CLASS_METRICS` and "<metric>|<k>" per class."""
    K = P.shape[1]
    C = _confusion(y, P.argmax(axis=1), K, weights)
    total, right = C.sum(axis=(1, 2)), np.einsum("rkk->rk", C)
    true, predicted = C.sum(axis=2), C.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sensitivity = right / true
        specificity = (total[:, None] - true - predicted + right) / (total[:, None] - true)
        f1 = 2 * right / (true + predicted)
        table = {
            "accuracy": right.sum(axis=1) / total,
            "balanced_accuracy": _nanmean(sensitivity),
            "macro_f1": _nanmean(f1),
            "kappa": _kappa(C, 1.0 - np.eye(K)),
            "quadratic_kappa": _kappa(C, (np.subtract.outer(np.arange(K), np.arange(K)) / (K - 1)) ** 2),
        }
    auroc = np.stack([weighted_auroc((y == k).astype(np.int64), P[:, k], weights) for k in range(K)], axis=1)
    table["macro_auroc"] = _nanmean(auroc)
    for k in range(K):
        for metric, values in zip(PER_CLASS_METRICS, (sensitivity, specificity, f1, auroc), strict=True):
            table[_key(metric, k)] = values[:, k]
    return {name: np.where(np.isfinite(values), values, np.nan) for name, values in table.items()}


def _cut_table(y: np.ndarray, P: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC of grade >= k by P(grade >= k) for each row of `weights`, as "auroc|<k>" for k = 1..K-1."""
    table = {
        _key("auroc", k): weighted_auroc((y >= k).astype(np.int64), P[:, k:].sum(axis=1), weights)
        for k in range(1, P.shape[1])
    }
    return {name: np.where(np.isfinite(values), values, np.nan) for name, values in table.items()}


def _kappa(C: np.ndarray, disagreement: np.ndarray) -> np.ndarray:
    """Weighted Cohen's kappa of confusion counts [r, K, K]: 1 - sum(w O) / sum(w E), E from the marginals."""
    total = C.sum(axis=(1, 2))
    expected = np.einsum("ri,rj->rij", C.sum(axis=2), C.sum(axis=1)) / total[:, None, None]
    return 1.0 - (C * disagreement).sum(axis=(1, 2)) / (expected * disagreement).sum(axis=(1, 2))


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over the defined (finite) entries of each row; NaN where none is."""
    defined = np.isfinite(values)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(defined, values, 0.0).sum(axis=1) / defined.sum(axis=1)


def _value(values: np.ndarray) -> float | None:
    value = float(values[0])
    return value if np.isfinite(value) else None
