"""Multi-label metrics: per-finding AUROC, their mean, GZSL seen / unseen / H, each with patient-bootstrap intervals."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tlfusion.errors import InputError
from tlfusion.evaluation.metrics import (
    BOOTSTRAP_CHUNK_CELLS,
    check_labels,
    check_scores,
    group_resamples,
    json_float,
    percentiles,
    weighted_auroc,
)


def multilabel_auroc(Y_true, scores, names: Sequence[str]) -> dict[str, float | None]:
    """AUROC per finding (``None`` where a column has one class) and ``"mean"`` over the defined ones."""
    Y, S = _multilabel_inputs(Y_true, scores)
    names = list(names)
    if len(names) != Y.shape[1]:
        raise InputError(f"names has {len(names)} entries but Y_true has {Y.shape[1]} columns")
    if len(set(names)) != len(names) or "mean" in names:
        raise InputError("names must be unique and must not include 'mean'")
    ones = np.ones((1, Y.shape[0]))
    result = {name: json_float(weighted_auroc(Y[:, j], S[:, j], ones)[0]) for j, name in enumerate(names)}
    defined = [value for value in result.values() if value is not None]
    result["mean"] = float(np.mean(defined)) if defined else None
    return result


def bootstrap_mean_auroc_ci(
    Y_true, scores, groups, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> list[float] | None:
    """Percentile interval of the mean per-finding AUROC (over the findings defined in each resample), resampling
    ``groups`` as ``bootstrap_ci`` does; ``None`` when ``n_boot`` is 0 or no resample defines any finding."""
    if not n_boot:
        return None
    return percentiles(_defined_mean(_finding_auroc_resamples(Y_true, scores, groups, n_boot, seed)), level)


def bootstrap_finding_auroc_ci(
    Y_true, scores, groups, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> list[list[float] | None]:
    """Percentile interval of each finding's AUROC (one per column), on the resamples of `bootstrap_mean_auroc_ci`
    (same ``seed``: same draws); ``None`` for a finding undefined in every resample."""
    resampled = _finding_auroc_resamples(Y_true, scores, groups, n_boot, seed)
    return [percentiles(resampled[:, j], level) for j in range(resampled.shape[1])]


def paired_bootstrap_mean_auroc_delta(
    Y_true, scores_a, scores_b, groups, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float | list[float] | None]:
    """Mean per-finding AUROC of scores A minus that of scores B on the same images: the observed difference and
    its percentile interval over shared group resamples (a paired bootstrap, as `paired_bootstrap_delta`)."""
    a = _finding_auroc_resamples(Y_true, scores_a, groups, n_boot, seed)
    b = _finding_auroc_resamples(Y_true, scores_b, groups, n_boot, seed)
    observed = _defined_mean(_observed_aurocs(Y_true, scores_a)) - _defined_mean(_observed_aurocs(Y_true, scores_b))
    return {"delta": json_float(observed[0]), "ci": percentiles(_defined_mean(a) - _defined_mean(b), level)}


def bootstrap_gzsl_ci(
    Y_true,
    scores,
    groups,
    seen: Sequence[int],
    unseen: Sequence[int],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float] | None]:
    """Percentile intervals of the GZSL means: mean AUROC over the ``seen`` columns, over the ``unseen`` columns,
    and their harmonic mean ``h``, each resample's three from the same draw."""
    resampled = _finding_auroc_resamples(Y_true, scores, groups, n_boot, seed)
    means = {"seen": _defined_mean(resampled[:, list(seen)]), "unseen": _defined_mean(resampled[:, list(unseen)])}
    with np.errstate(divide="ignore", invalid="ignore"):
        means["h"] = 2 * means["seen"] * means["unseen"] / (means["seen"] + means["unseen"])
    return {key: percentiles(values, level) for key, values in means.items()}


def _finding_auroc_resamples(Y_true, scores, groups, n_boot: int, seed: int) -> np.ndarray:
    """AUROC of each finding in each group resample, [n_boot, findings] (NaN where undefined)."""
    Y, S = _multilabel_inputs(Y_true, scores)
    draws, item_group = group_resamples(len(Y), groups, n_boot, seed)
    chunk = max(1, BOOTSTRAP_CHUNK_CELLS // len(Y))
    blocks = []
    for start in range(0, len(draws), chunk):
        weights = draws[start : start + chunk][:, item_group].astype(float)
        blocks.append(np.stack([weighted_auroc(Y[:, j], S[:, j], weights) for j in range(Y.shape[1])], axis=1))
    return np.concatenate(blocks)


def _observed_aurocs(Y_true, scores) -> np.ndarray:
    """AUROC of each finding on the images as they are, one row [1, findings] (NaN where undefined)."""
    Y, S = _multilabel_inputs(Y_true, scores)
    ones = np.ones((1, len(Y)))
    return np.stack([weighted_auroc(Y[:, j], S[:, j], ones) for j in range(Y.shape[1])], axis=1)


def _defined_mean(per_finding: np.ndarray) -> np.ndarray:
    """Row means over the defined (finite) columns; NaN for a row with none."""
    defined = np.isfinite(per_finding).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(defined > 0, np.nansum(per_finding, axis=1) / defined, np.nan)


def _multilabel_inputs(Y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels and finite scores, both [items, findings]."""
    Y = np.asarray(Y_true)
    S = check_scores(scores, "scores", probabilities=False)
    if Y.ndim != 2 or Y.shape != S.shape:
        raise InputError(f"Y_true and scores must be 2-D of the same shape, got {Y.shape} and {S.shape}")
    return check_labels(Y.ravel(), "Y_true").reshape(Y.shape), S
