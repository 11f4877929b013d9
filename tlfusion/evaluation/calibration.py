"""Calibration: does a predicted 0.8 mean 80 %? Brier score, expected calibration error (ECE), reliability bins with
patient-bootstrap intervals, and post-hoc recalibration (sigmoid or isotonic) kept as plain arrays.

Probabilities are binary, `prob` [n] (the positive class's) with labels 0/1, or K-class, `prob` [n, K] (rows summing
to 1) with labels 0..K-1.

- Brier score: binary, the mean of (p - y)^2; K-class, the mean over items of sum_k (p_k - [y = k])^2 (Brier 1950;
  for K = 2 that is twice the binary score).
- Binning: `BINS` (10) equal-width bins of the score on [0, 1]: [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0]. The score is
  the positive class's probability (binary; observed: the fraction of positives) or the top-label confidence, the
  largest probability (K-class; observed: the fraction predicted right, Guo et al. 2017).
- ECE: sum over bins of (n_b / n) |observed_b - mean score_b|; empty bins add nothing.

Recalibration maps each probability column on its own, fitted on out-of-fold probabilities (never on test): sigmoid
(Platt scaling on the log-odds, sigma(a logit(p) + b), with Platt's smoothed targets) or isotonic (a non-decreasing
step fit, interpolated linearly between its knots and clipped at its ends, as scikit-learn predicts). K-class maps
are one-vs-rest, then each row is renormalised. A `Calibrator` is arrays only: saved as `.npz`, read without pickles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlfusion.errors import InputError
from tlfusion.evaluation import metrics

BINS = 10
BINNING = f"{BINS} equal-width bins of the predicted probability on [0, 1]"
METHODS = ("sigmoid", "isotonic")
STATISTICS = ("brier", "ece")
_EPS = 1e-6  # probabilities are clipped to [_EPS, 1 - _EPS] before taking log-odds


def _items(y_true, prob) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item: (score binned, hit: 1 where the binned event happened, squared error summed over classes)."""
    p = metrics.check_scores(prob)
    if p.ndim == 1:
        y = metrics.check_labels(y_true)
        _same_length(y, p)
        return p, y.astype(float), (p - y) ** 2
    y = np.asarray(y_true)
    if p.ndim != 2 or y.ndim != 1 or not np.isin(y, np.arange(p.shape[1])).all():
        raise InputError(f"prob [n, K] needs labels 0..K-1, one per row; got shapes {p.shape} and {y.shape}")
    _same_length(y, p)
    truth = np.eye(p.shape[1])[y.astype(int)]
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(float), ((p - truth) ** 2).sum(axis=1)


def _same_length(y: np.ndarray, p: np.ndarray) -> None:
    if len(y) != len(p):
        raise InputError(f"prob has {len(p)} rows but y_true {len(y)} labels")


def _bins(score: np.ndarray) -> np.ndarray:
    """One-hot bin membership [n, BINS] (the last bin closed at 1)."""
    return np.eye(BINS)[np.minimum((score * BINS).astype(int), BINS - 1)]


def _statistics(score: np.ndarray, hit: np.ndarray, squared: np.ndarray) -> Callable[[np.ndarray], dict]:
    """Brier and ECE for each row of item weights (resamples x items)."""
    members = _bins(score)
    hits, scores = members * hit[:, None], members * score[:, None]

    def table(weights: np.ndarray) -> dict[str, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            total = weights.sum(axis=1)
            return {
                "brier": weights @ squared / total,
                "ece": np.abs(weights @ hits - weights @ scores).sum(axis=1) / total,
            }

    return table


def calibration_metrics(y_true, prob) -> dict[str, float]:
    """Brier score and ECE (see the module for the definitions and the binning)."""
    table = _statistics(*_items(y_true, prob))(np.ones((1, len(np.asarray(prob)))))
    return {name: float(table[name][0]) for name in STATISTICS}


def reliability_bins(y_true, prob) -> list[dict]:
    """The reliability diagram's points: each non-empty bin's bounds, count, mean score and observed fraction."""
    score, hit, _ = _items(y_true, prob)
    members = _bins(score)
    counts = members.sum(axis=0)
    return [
        {
            "low": b / BINS,
            "high": (b + 1) / BINS,
            "n": int(counts[b]),
            "mean_prob": float(members[:, b] @ score / counts[b]),
            "observed": float(members[:, b] @ hit / counts[b]),
        }
        for b in range(BINS)
        if counts[b]
    ]


def calibration_summary(y_true, prob, groups, n_boot: int = 1000, seed: int = 0) -> dict:
    """n, Brier, ECE, their patient-bootstrap intervals (`metrics.bootstrap_statistics`; none when `n_boot` is 0)
    and the reliability bins."""
    items = _items(y_true, prob)
    ci = {}
    if n_boot:
        ci = metrics.bootstrap_statistics(len(items[0]), groups, _statistics(*items), n_boot=n_boot, seed=seed)
    return {"n": len(items[0]), **calibration_metrics(y_true, prob), "ci": ci, "bins": reliability_bins(y_true, prob)}


@dataclass(frozen=True)
class Calibrator:
    """A fitted recalibration: per probability column, two arrays (sigmoid: [a], [b]; isotonic: knots x, y)."""

    method: str
    columns: tuple[tuple[np.ndarray, np.ndarray], ...]

    def apply(self, prob) -> np.ndarray:
        """Recalibrated probabilities, shaped as `prob`: [n] (binary), or [n, K] with rows renormalised; a binary
        calibrator on [n, 2] maps the positive column and completes the negative one."""
        p = metrics.check_scores(prob)
        if p.ndim == 1:
            return self._map(0, p)
        if len(self.columns) == 1 and p.shape[1] == 2:
            positive = self._map(0, p[:, 1])
            return np.column_stack([1 - positive, positive])
        if p.shape[1] != len(self.columns):
            raise InputError(f"calibration: fitted on {len(self.columns)} columns, given {p.shape[1]}")
        mapped = np.column_stack([self._map(k, p[:, k]) for k in range(p.shape[1])])
        totals = mapped.sum(axis=1, keepdims=True)
        return np.divide(mapped, totals, out=np.full_like(mapped, 1 / p.shape[1]), where=totals > 0)

    def _map(self, column: int, p: np.ndarray) -> np.ndarray:
        a, b = self.columns[column]
        if self.method == "sigmoid":
            return 1 / (1 + np.exp(-(a[0] * _logit(p) + b[0])))
        return np.interp(p, a, b)

    def save(self, path: Path) -> None:
        """Write the arrays to `path` as an uncompressed `.npz` (`method`, then `a<k>`, `b<k>` per column)."""
        arrays = {f"{name}{k}": pair[i] for k, pair in enumerate(self.columns) for i, name in enumerate("ab")}
        with open(path, "wb") as file:
            np.savez(file, method=np.array(self.method), **arrays)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def fit_calibrator(method: str, y_true, prob) -> Calibrator:
    """Fit `method` ("sigmoid" or "isotonic") on out-of-fold labels and probabilities ([n] binary, [n, K])."""
    if method not in METHODS:
        raise InputError(f"calibration: method must be one of {', '.join(METHODS)}; got {method!r}")
    p = metrics.check_scores(prob)
    _items(y_true, p)  # checks labels and shapes
    y = np.asarray(y_true).astype(int)
    pairs = [(p, y)] if p.ndim == 1 else [(p[:, k], (y == k).astype(int)) for k in range(p.shape[1])]
    if any(t.min() == t.max() for _, t in pairs):
        raise InputError("calibration: the out-of-fold labels hold one class only; nothing to calibrate against")
    fit = _fit_sigmoid if method == "sigmoid" else _fit_isotonic
    return Calibrator(method, tuple(fit(column, target) for column, target in pairs))


def _fit_sigmoid(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Platt scaling on the log-odds: (a, b) minimising the log loss against Platt's smoothed targets."""
    from scipy.optimize import minimize

    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    target = np.where(y == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    z = _logit(p)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        s = params[0] * z + params[1]
        value = np.logaddexp(0, s) - target * s  # -[t log sigma(s) + (1 - t) log(1 - sigma(s))]
        residual = 1 / (1 + np.exp(-s)) - target
        return float(value.sum()), np.array([residual @ z, residual.sum()])

    solution = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return solution.x[:1].copy(), solution.x[1:].copy()


def _fit_isotonic(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's isotonic fit on [0, 1]: its knots (x, y)."""
    from sklearn.isotonic import IsotonicRegression

    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
    return np.asarray(fitted.X_thresholds_, float), np.asarray(fitted.y_thresholds_, float)


def load_calibrator(path: Path) -> Calibrator:
    """Read what `Calibrator.save` wrote, checking names, shapes and values (InputError naming `path`)."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            values = {name: arrays[name] for name in arrays.files}
        method = str(values.pop("method"))
    except (KeyError, ValueError, OSError) as error:
        raise InputError(f"{path}: not a calibration ({error})") from None
    count = len(values) // 2
    if method not in METHODS or not count or set(values) != {f"{ab}{k}" for k in range(count) for ab in "ab"}:
        raise InputError(f"{path}: not a calibration (method {method!r}, arrays {sorted(values)})")
    columns = tuple((values[f"a{k}"], values[f"b{k}"]) for k in range(count))
    if not all(_valid_column(method, a, b) for a, b in columns):
        raise InputError(f"{path}: calibration arrays of the wrong shapes or values")
    return Calibrator(method, tuple((a.astype(float), b.astype(float)) for a, b in columns))


def _valid_column(method: str, a: np.ndarray, b: np.ndarray) -> bool:
    """Finite 1-D numbers: sigmoid one slope and one intercept; isotonic knots with x and y non-decreasing in
    [0, 1]."""
    if a.dtype.kind not in "fi" or b.dtype.kind not in "fi" or a.ndim != 1 or a.shape != b.shape or not len(a):
        return False
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return False
    if method == "sigmoid":
        return len(a) == 1
    in_range = a.min() >= 0 and a.max() <= 1 and b.min() >= 0 and b.max() <= 1
    return bool(in_range and (np.diff(a) >= 0).all() and (np.diff(b) >= 0).all())


def calibrated_model(predictions, model: str, method: str, criterion: str = "kappa") -> tuple[Calibrator, float]:
    """`model`'s calibrator fitted on its out-of-fold rows of fit/predictions.csv (split "cv": never the test
    split), and the threshold `criterion` picks on those rows recalibrated (kappa: the fit stage's criterion)."""
    cv = predictions[(predictions["model"] == model) & (predictions["split"] == "cv")]
    y, prob = cv["y_true"].to_numpy(), cv["prob"].to_numpy()
    calibrator = fit_calibrator(method, y, prob)
    return calibrator, metrics.choose_threshold(y, calibrator.apply(prob), criterion)


def calibration_record(
    predictions, method: str | None, split: str, n_boot: int, seed: int, stage: str = "before"
) -> dict:
    """metrics.json's `calibration`: every model's Brier, ECE (intervals, reliability bins) on `split` as predicted
    (`stage`: "before", or "after" for a recalibrated bundle's) and, with `method`, recalibrated ("after", with
    its threshold), each calibrator fitted on the model's out-of-fold rows."""
    rows = []
    for model, test in predictions[predictions["split"] == split].groupby("model", sort=False):
        y, prob, groups = (test[column].to_numpy() for column in ("y_true", "prob", "patient"))
        head = {"model": str(model), "split": split}
        rows.append(head | {"stage": stage, **calibration_summary(y, prob, groups, n_boot, seed)})
        if method:
            calibrator, threshold = calibrated_model(predictions, str(model), method)
            after = calibration_summary(y, calibrator.apply(prob), groups, n_boot, seed)
            rows.append(head | {"stage": "after", "threshold": threshold, **after})
    return {"method": method, "binning": BINNING, "rows": rows}
