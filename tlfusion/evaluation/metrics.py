"""Binary metrics, study-level aggregation, thresholds and group-bootstrap confidence intervals.

Pure numpy. Every metric is computed from (possibly weighted) confusion counts, so a point estimate and a
thousand bootstrap resamples go through the same code. Results are plain Python floats, with ``None`` where a
metric is undefined (e.g. AUROC with one class), so they drop straight into ``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tlfusion.errors import InputError

METRICS = ("accuracy", "f1", "kappa", "auroc", "sensitivity", "specificity")


THRESHOLD_CRITERIA = ("kappa", "youden", "f1")


STUDY_AGGREGATIONS = ("mean", "max")


BOOTSTRAP_CHUNK_CELLS = 2_000_000  # resamples x items held in memory at once


def check_labels(y, name: str = "y_true") -> np.ndarray:
    """Return ``y`` as a 1-D int array of 0/1 labels, or raise InputError naming ``name``."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise InputError(f"{name} must be one-dimensional, got shape {y.shape}")
    if y.size == 0:
        raise InputError(f"{name} is empty")
    if y.dtype == bool:
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.number):
        raise InputError(f"{name} must hold 0/1 labels, got values of type {y.dtype}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise InputError(f"{name} must hold only 0 and 1, found {np.unique(y[bad])[:5].tolist()}")
    return y.astype(np.int64)


def check_scores(scores, name: str = "prob", probabilities: bool = True) -> np.ndarray:
    """Return ``scores`` as a float array with no NaN/inf (and within [0, 1] if ``probabilities``)."""
    try:
        scores = np.asarray(scores, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be numeric ({exc})") from None
    finite = np.isfinite(scores)
    if not finite.all():
        raise InputError(f"{name} contains NaN or inf ({int((~finite).sum())} of {scores.size} values)")
    if probabilities and scores.size and (scores.min() < 0 or scores.max() > 1):
        raise InputError(f"{name} must lie in [0, 1], got range [{scores.min():g}, {scores.max():g}]")
    return scores


def group_index(groups, n: int, name: str = "groups") -> tuple[np.ndarray, np.ndarray]:
    """Check ``groups`` (patient or study ids, one per item) and return (sorted unique ids, index per item)."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != n:
        raise InputError(f"{name} must be one-dimensional with {n} entries, got shape {groups.shape}")
    if groups.dtype.kind == "f":
        missing = np.isnan(groups)
    elif groups.dtype == object:
        missing = np.array([g is None or g != g for g in groups], dtype=bool)  # None or NaN
    else:
        missing = np.zeros(n, dtype=bool)
    if missing.any():
        raise InputError(f"{name} has {int(missing.sum())} missing ids")
    try:
        return np.unique(groups, return_inverse=True)
    except TypeError:
        raise InputError(f"{name} mixes id types (e.g. numbers and strings)") from None


def binary_metrics(y_true, prob, threshold: float = 0.5) -> dict:
    """Accuracy, F1, Cohen's kappa, AUROC, sensitivity, specificity and confusion at ``prob >= threshold``.

    ``confusion`` is ``[[tn, fp], [fn, tp]]``. Undefined metrics (AUROC with one class, sensitivity without
    positives, specificity without negatives, F1 or kappa when both labels and predictions are one class)
    are ``None``.
    """
    y, p = _binary_inputs(y_true, prob)
    predicted = p >= _check_threshold(threshold)
    table = _metric_table(y, p, predicted, np.ones((1, len(y))))
    tn, fp, fn, tp = (int(table[key][0]) for key in ("tn", "fp", "fn", "tp"))
    return {
        "n": len(y),
        **{metric: json_float(table[metric][0]) for metric in METRICS},
        "confusion": [[tn, fp], [fn, tp]],
    }


def bootstrap_ci(
    y_true,
    prob,
    groups,
    threshold: float = 0.5,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float] | None]:
    """Percentile confidence intervals of each metric, resampling ``groups`` (patients/studies) with replacement.

    A resample draws as many groups as there are, with replacement, and keeps every item of each drawn group
    (once per draw). Resamples where a metric is undefined are skipped for that metric; a metric undefined in
    every resample gets ``None``. ``groups=None`` resamples single items (only for data without patient ids).
    """
    y, p = _binary_inputs(y_true, prob)
    resamples = group_resamples(len(y), groups, n_boot, seed)
    table = _chunked_metric_table(y, p, p >= _check_threshold(threshold), resamples)
    return {metric: percentiles(table[metric], level) for metric in METRICS}


def paired_bootstrap_delta(
    y_true,
    prob_a,
    prob_b,
    groups,
    thresholds: tuple[float, float] = (0.5, 0.5),
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float | list[float] | None]]:
    """Model A minus model B on the same items: each metric's observed difference and its percentile interval
    (`thresholds`: A's and B's).

    Both models are scored on the same group resamples (a paired bootstrap), so the interval reflects how much the
    difference, not each model alone, moves; an interval excluding 0 means A and B differ at that level.
    """
    y, p_a = _binary_inputs(y_true, prob_a)
    _, p_b = _binary_inputs(y_true, prob_b)
    threshold_a, threshold_b = thresholds
    resamples = group_resamples(len(y), groups, n_boot, seed)
    a = _chunked_metric_table(y, p_a, p_a >= _check_threshold(threshold_a), resamples)
    b = _chunked_metric_table(y, p_b, p_b >= _check_threshold(threshold_b), resamples)
    observed_a, observed_b = binary_metrics(y, p_a, threshold_a), binary_metrics(y, p_b, threshold_b)
    return {
        metric: {
            "delta": None
            if observed_a[metric] is None or observed_b[metric] is None
            else observed_a[metric] - observed_b[metric],
            "ci": percentiles(a[metric] - b[metric], level),
        }
        for metric in METRICS
    }


def aggregate_by_study(study_ids, y_true, prob, how: str = "mean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Collapse image-level predictions to one per study: (sorted study ids, study labels, study probabilities).

    ``how`` is ``"mean"`` or ``"max"`` of the image probabilities. Every image of a study must share its label.
    """
    y, p = _binary_inputs(y_true, prob)
    if how not in STUDY_AGGREGATIONS:
        raise InputError(f"how must be one of {', '.join(STUDY_AGGREGATIONS)}; got {how!r}")
    ids, image_study = group_index(study_ids, len(y), "study_ids")
    images_per_study = np.bincount(image_study)
    positive_fraction = np.bincount(image_study, weights=y) / images_per_study
    mixed = (positive_fraction > 0) & (positive_fraction < 1)
    if mixed.any():
        raise InputError(
            f"study_ids: {int(mixed.sum())} studies have mixed labels, e.g. {ids[mixed][0]!r}; a study needs one label"
        )
    if how == "mean":
        study_prob = np.bincount(image_study, weights=p) / images_per_study
    else:
        study_prob = np.zeros(len(ids))
        np.maximum.at(study_prob, image_study, p)
    return ids, (positive_fraction == 1).astype(np.int64), study_prob


def choose_threshold(y_true, prob, criterion: str = "kappa") -> float:
    """The threshold (``prob >= t`` is positive) that maximises ``criterion`` ("kappa", "youden" or "f1").

    Candidates are the lowest probability and the midpoints between consecutive distinct probabilities; ties
    go to the lowest threshold. Use validation or out-of-fold predictions only, never the test split.
    """
    y, p = _binary_inputs(y_true, prob)
    if criterion not in THRESHOLD_CRITERIA:
        raise InputError(f"criterion must be one of {', '.join(THRESHOLD_CRITERIA)}; got {criterion!r}")
    if y.min() == y.max():
        raise InputError(f"y_true holds only class {y[0]}; choosing a threshold needs both classes")
    values, value_index = np.unique(p, return_inverse=True)
    positives = np.bincount(value_index, weights=y)
    negatives = np.bincount(value_index, weights=1 - y)
    # candidate j predicts positive for values[j] and above
    tp = np.cumsum(positives[::-1])[::-1]
    fp = np.cumsum(negatives[::-1])[::-1]
    rates = _rates(negatives.sum() - fp, fp, positives.sum() - tp, tp)
    score = rates["sensitivity"] + rates["specificity"] - 1 if criterion == "youden" else rates[criterion]
    candidates = np.concatenate([values[:1], (values[:-1] + values[1:]) / 2])
    return float(candidates[np.nanargmax(score)])


def _binary_inputs(y_true, prob) -> tuple[np.ndarray, np.ndarray]:
    y = check_labels(y_true)
    p = check_scores(prob)
    if p.ndim != 1 or len(p) != len(y):
        raise InputError(f"prob must be one-dimensional with {len(y)} values like y_true, got shape {p.shape}")
    return y, p


def _check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float, np.number)) or not 0 <= threshold <= 1:
        raise InputError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


def group_resamples(n: int, groups, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded group draws with replacement: (n_boot, n_groups) draw counts, and each item's group index."""
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"n_boot must be a positive integer, got {n_boot!r}")
    _, item_group = group_index(np.arange(n) if groups is None else groups, n)
    n_groups = int(item_group.max()) + 1
    draws = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    return draws, item_group


def bootstrap_statistics(
    n: int,
    groups,
    statistics: Callable[[np.ndarray], dict[str, np.ndarray]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float] | None]:
    """Percentile intervals of what ``statistics(weights)`` returns (name -> one value per row of ``weights``,
    resamples x items, each item's count in each resample) on ``bootstrap_ci``'s resamples of ``groups``: the one
    patient bootstrap, for statistics other than ``METRICS`` (e.g. ``tlfusion.evaluation.calibration``'s)."""
    table = _chunked(group_resamples(n, groups, n_boot, seed), n, statistics)
    return {name: percentiles(values, level) for name, values in table.items()}


def _chunked(resamples: tuple, n: int, statistics: Callable[[np.ndarray], dict[str, np.ndarray]]) -> dict:
    """`statistics` of every resample of `group_resamples`, a memory-bounded chunk of resamples at a time."""
    draws, item_group = resamples
    chunk = max(1, BOOTSTRAP_CHUNK_CELLS // n)
    tables = [
        statistics(draws[start : start + chunk][:, item_group].astype(float)) for start in range(0, len(draws), chunk)
    ]
    return {name: np.concatenate([table[name] for table in tables]) for name in tables[0]}


def _chunked_metric_table(y: np.ndarray, p: np.ndarray, predicted: np.ndarray, resamples: tuple) -> dict:
    """`_metric_table` for every resample of `group_resamples`."""
    table = _chunked(resamples, len(y), lambda weights: _metric_table(y, p, predicted, weights))
    return {metric: table[metric] for metric in METRICS}


def percentiles(values: np.ndarray, level: float) -> list[float] | None:
    """The central `level` percentile interval of the finite `values`; None when there are none."""
    if not 0 < level < 1:
        raise InputError(f"level must be between 0 and 1, got {level!r}")
    values = values[np.isfinite(values)]
    tail = (1 - level) / 2
    return [float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))] if values.size else None


def _metric_table(y: np.ndarray, p: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> dict:
    """Confusion counts and every metric for each row of ``weights`` (resamples x items, counts per item)."""
    counts = {
        "tn": weights @ ((y == 0) & ~predicted),
        "fp": weights @ ((y == 0) & predicted),
        "fn": weights @ ((y == 1) & ~predicted),
        "tp": weights @ ((y == 1) & predicted),
    }
    return {**counts, **_rates(**counts), "auroc": weighted_auroc(y, p, weights)}


def _rates(tn, fp, fn, tp) -> dict[str, np.ndarray]:
    """Threshold metrics from confusion counts (arrays); NaN where undefined."""
    tn, fp, fn, tp = (np.asarray(count, dtype=float) for count in (tn, fp, fn, tp))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "accuracy": _defined((tp + tn) / (tp + tn + fp + fn)),
            "f1": _defined(2 * tp / (2 * tp + fp + fn)),
            "kappa": _defined(2 * (tp * tn - fn * fp) / ((tp + fp) * (fp + tn) + (tp + fn) * (fn + tn))),
            "sensitivity": _defined(tp / (tp + fn)),
            "specificity": _defined(tn / (tn + fp)),
        }


def weighted_auroc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUROC (ties count one half) for each row of ``weights``; NaN with one class."""
    order = np.argsort(p, kind="stable")
    sorted_p, sorted_y, sorted_w = p[order], y[order], weights[:, order]
    tie_starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
    positives = np.add.reduceat(sorted_w * sorted_y, tie_starts, axis=1)
    negatives = np.add.reduceat(sorted_w * (1 - sorted_y), tie_starts, axis=1)
    negatives_below = np.cumsum(negatives, axis=1) - negatives
    wins = (positives * (negatives_below + 0.5 * negatives)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _defined(wins / (positives.sum(axis=1) * negatives.sum(axis=1)))


def _defined(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def json_float(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
