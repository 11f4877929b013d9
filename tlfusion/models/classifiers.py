"""Registry of scikit-learn / XGBoost classifiers for fused features, and patient-grouped model selection.

Every registry entry builds a plain sklearn estimator (or Pipeline) with ``predict_proba``, seeded by
``random_state``. ``select_model`` compares candidates by grouped cross-validation on the training data only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier, VotingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import ParameterGrid
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from xgboost import XGBClassifier

from tlfusion.data.splits import grouped_folds
from tlfusion.errors import InputError
from tlfusion.evaluation import class_metrics, metrics

logger = logging.getLogger(__name__)

N_JOBS = 2
FUSION_STEP, CLASSIFIER_STEP = "fusion", "clf"
"""Step names of ``fusion_pipeline``."""
SCORINGS = ("kappa", "f1", "accuracy", "auroc")


def build_lr(random_state: int = 0) -> Pipeline:
    """Standardised L2 logistic regression; small C because fused features far outnumber samples."""
    return _standardised(LogisticRegression(C=0.05, class_weight="balanced", max_iter=2000, random_state=random_state))


def build_svm(random_state: int = 0) -> Pipeline:
    """Standardised RBF SVM with Platt-scaled probabilities from 3-fold calibration."""
    svc = SVC(C=1.0, kernel="rbf", gamma="scale", class_weight="balanced", random_state=random_state)
    return _standardised(CalibratedClassifierCV(svc, method="sigmoid", cv=3))


def build_rf(random_state: int = 0) -> RandomForestClassifier:
    """Random forest of 200 balanced trees."""
    return RandomForestClassifier(n_estimators=200, class_weight="balanced", n_jobs=N_JOBS, random_state=random_state)


def build_knn(random_state: int = 0) -> Pipeline:
    """Distance-weighted 5-nearest neighbours on standardised features (deterministic; seed unused)."""
    return _standardised(KNeighborsClassifier(n_neighbors=5, weights="distance"))


def build_xgb(random_state: int = 0) -> XGBClassifier:
    """Gradient-boosted trees (hist, 64 bins), shallow and row/column subsampled for small training sets."""
    return XGBClassifier(
        n_estimators=200,
        max_depth=3,
        learning_rate=0.1,
        subsample=0.8,
        colsample_bytree=0.5,
        tree_method="hist",
        max_bin=64,
        eval_metric="logloss",
        n_jobs=N_JOBS,
        random_state=random_state,
    )


def build_vote(random_state: int = 0) -> VotingClassifier:
    """Soft vote (mean probability) of lr, svm, rf and xgb."""
    members = {"lr": build_lr, "svm": build_svm, "rf": build_rf, "xgb": build_xgb}
    return VotingClassifier([(name, build(random_state)) for name, build in members.items()], voting="soft")


CLASSIFIERS: dict[str, Callable[[int], BaseEstimator]] = {
    "lr": build_lr,
    "svm": build_svm,
    "rf": build_rf,
    "knn": build_knn,
    "xgb": build_xgb,
    "vote": build_vote,
}


def make_classifier(name: str, random_state: int = 0, **params) -> BaseEstimator:
    """Build registry entry ``name`` seeded by ``random_state``, with ``params`` set on it.

    A parameter may be given by its full sklearn key (``clf__C``) or by its last part (``C``) when that names
    exactly one parameter of the estimator.
    """
    if name not in CLASSIFIERS:
        raise InputError(f"unknown classifier {name!r}; valid names: {', '.join(CLASSIFIERS)}")
    estimator = CLASSIFIERS[name](random_state)
    valid_keys = estimator.get_params(deep=True)
    return estimator.set_params(**{_resolve_param(name, valid_keys, key): value for key, value in params.items()})


def fusion_pipeline(fusion: BaseEstimator, classifier: BaseEstimator) -> Pipeline:
    """``Pipeline([("fusion", fusion), ("clf", classifier)])``: the form a model is cross-validated, refitted and
    bundled in, so fitting it fits the fusion transform (scaling, PCA) on the same rows as the classifier."""
    return Pipeline([(FUSION_STEP, fusion), (CLASSIFIER_STEP, classifier)])


def build_model(
    name: str, random_state: int = 0, params: Mapping | None = None, fusion: BaseEstimator | None = None
) -> BaseEstimator:
    """Unfitted classifier ``name`` with ``params`` (``make_classifier``), behind an unfitted clone of ``fusion``
    (``fusion_pipeline``) when one is given."""
    classifier = make_classifier(name, random_state, **(params or {}))
    return classifier if fusion is None else fusion_pipeline(clone(fusion), classifier)


@dataclass
class Selection:
    """Outcome of ``select_model``; every entry is keyed by classifier name."""

    scores: dict[str, float]
    """Mean cross-validated score (NaN if undefined in every fold)."""
    oof_prob: dict[str, np.ndarray]
    """Out-of-fold positive-class probabilities, aligned with the training rows."""
    thresholds: dict[str, float]
    """Threshold chosen on the out-of-fold probabilities."""
    params: dict[str, dict]
    """Parameters picked from ``param_grid`` (empty without a grid)."""


def select_model(
    X,
    y,
    groups,
    names: Sequence[str],
    cv: int = 5,
    random_state: int = 0,
    scoring: str = "kappa",
    threshold_criterion: str = "kappa",
    param_grid: Mapping[str, Mapping[str, Sequence]] | None = None,
    label: str | None = None,
    fusion: BaseEstimator | None = None,
) -> Selection:
    """Score each classifier by grouped cross-validated ``scoring`` on TRAINING data (the caller picks the best).

    Folds come from ``data.splits.grouped_folds`` over ``groups`` (patient ids; ``None`` means one group per row),
    reduced when a class has fewer groups than ``cv``. Each fold is scored at the threshold that
    ``metrics.choose_threshold`` picks on the other folds' out-of-fold probabilities, so the score covers the
    model and its threshold rule. ``param_grid`` (e.g. ``{"lr": {"C": [0.005, 0.05, 0.5]}}``) maps a name to a
    small grid searched by the same folds. ``label`` (e.g. the feature set) prefixes the classifier names in log lines.
    With ``fusion`` (an unfitted transformer), each candidate is ``build_model(..., fusion=fusion)``: every fold
    fits its own fusion transform on that fold's training rows only.
    """
    X, y, groups = _check_training_data(X, y, groups)
    names = list(names)
    _check_selection(scoring, threshold_criterion)
    candidates = _candidates(names, param_grid)
    folds = grouped_folds(y, groups, cv, random_state, what="cv")
    scores, oof_prob, params = {}, {}, {}
    for name in names:
        for candidate in candidates[name]:
            oof = _oof_prob(build_model(name, random_state, candidate, fusion), X, y, folds)
            score = _cv_score(y, oof, folds, scoring, threshold_criterion)
            if name not in scores or np.isnan(scores[name]) or score > scores[name]:
                scores[name], oof_prob[name], params[name] = score, oof, candidate
        shown = f"{label}/{name}" if label else name
        logger.debug("select_model: %s %s = %.4f %s", shown, scoring, scores[name], params[name] or "")
    _log_scores(scores, scoring, label)
    return Selection(
        scores=scores,
        oof_prob=oof_prob,
        thresholds={name: metrics.choose_threshold(y, oof_prob[name], threshold_criterion) for name in names},
        params=params,
    )


@dataclass
class ClassSelection:
    """Outcome of ``select_class_model``; every entry is keyed by classifier name."""

    scores: dict[str, float]
    """Mean cross-validated score (NaN if undefined in every fold)."""
    oof_prob: dict[str, np.ndarray]
    """Out-of-fold class probabilities [n, K], aligned with the training rows."""
    params: dict[str, dict]
    """Parameters picked from ``param_grid`` (empty without a grid)."""


def select_class_model(
    X,
    y,
    groups,
    names: Sequence[str],
    n_classes: int,
    cv: int = 5,
    random_state: int = 0,
    scoring: str = "macro_f1",
    param_grid: Mapping[str, Mapping[str, Sequence]] | None = None,
    label: str | None = None,
    fusion: BaseEstimator | None = None,
) -> ClassSelection:
    """``select_model`` for K >= 3 classes (``y``: codes 0..``n_classes``-1): each classifier scored by grouped,
    stratified cross-validated ``scoring`` (one of ``class_metrics.CLASS_METRICS``) of its most probable class, on
    TRAINING data only; the caller picks the best."""
    if scoring not in class_metrics.CLASS_METRICS:
        raise InputError(f"scoring must be one of {', '.join(class_metrics.CLASS_METRICS)}; got {scoring!r}")
    X, y, groups = _check_class_training_data(X, y, groups, n_classes)
    names = list(names)
    candidates = _candidates(names, param_grid)
    folds = grouped_folds(y, groups, cv, random_state, what="cv")
    scores, oof_prob, params = {}, {}, {}
    for name in names:
        for candidate in candidates[name]:
            oof = _oof_class_prob(build_model(name, random_state, candidate, fusion), X, y, folds, n_classes)
            fold_scores = [class_metrics.class_score(y[test], oof[test], scoring) for _, test in folds]
            defined = [score for score in fold_scores if score is not None]
            score = float(np.mean(defined)) if defined else float("nan")
            if name not in scores or np.isnan(scores[name]) or score > scores[name]:
                scores[name], oof_prob[name], params[name] = score, oof, candidate
    _log_scores(scores, scoring, label)
    return ClassSelection(scores=scores, oof_prob=oof_prob, params=params)


def _log_scores(scores: dict[str, float], scoring: str, label: str | None) -> None:
    """The CV scores on one log line; InputError when none is defined."""
    listed = ", ".join(f"{name} {score:.4f}" for name, score in scores.items())
    logger.info("select_model: %sCV %s %s", f"{label}: " if label else "", scoring, listed)
    if not any(np.isfinite(score) for score in scores.values()):
        raise InputError(f"no classifier has a defined {scoring} in any fold; the training set is too small")


def _check_selection(scoring: str, threshold_criterion: str) -> None:
    if scoring not in SCORINGS:
        raise InputError(f"scoring must be one of {', '.join(SCORINGS)}; got {scoring!r}")
    if threshold_criterion not in metrics.THRESHOLD_CRITERIA:
        raise InputError(
            f"threshold_criterion must be one of {', '.join(metrics.THRESHOLD_CRITERIA)}; got {threshold_criterion!r}"
        )


def _candidates(names: list[str], param_grid: Mapping | None) -> dict:
    """Classifier name -> the parameter combinations to cross-validate, the grid checked."""
    if not names:
        raise InputError("names: give at least one classifier to select from")
    param_grid = dict(param_grid or {})
    unused = sorted(set(param_grid) - set(names))
    if unused:
        raise InputError(f"param_grid names classifiers not being selected: {', '.join(unused)}")
    return {name: _parameter_grid(name, param_grid.get(name, {})) for name in names}


def _standardised(estimator: BaseEstimator) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", estimator)])


def _resolve_param(name: str, valid_keys: Mapping, key: str) -> str:
    if key in valid_keys:
        return key
    matches = [valid for valid in valid_keys if valid.endswith(f"__{key}")]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise InputError(f"parameter {key!r} of classifier {name!r} is ambiguous; use one of {', '.join(matches)}")
    raise InputError(f"unknown parameter {key!r} for classifier {name!r}")


def _parameter_grid(name: str, grid: Mapping[str, Sequence]) -> list[dict]:
    """The grid's parameter combinations (``[{}]`` for no grid), each checked against classifier ``name``."""
    try:
        candidates = list(ParameterGrid(dict(grid)))
    except (TypeError, ValueError) as exc:
        raise InputError(f"param_grid[{name!r}]: {exc}") from None
    for candidate in candidates:
        make_classifier(name, **candidate)
    return candidates


def _check_features(X) -> np.ndarray:
    try:
        X = np.asarray(X, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(f"features must be numeric ({exc})") from None
    if X.ndim != 2:
        raise InputError(f"features must be 2-D (samples x features), got shape {X.shape}")
    bad_rows = ~np.isfinite(X).all(axis=1)
    if bad_rows.any():
        raise InputError(f"features contain NaN or inf in {int(bad_rows.sum())} of {len(X)} rows")
    return X


def _check_class_training_data(X, y, groups, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, codes 0..n_classes-1 (every class present) and group indices, or InputError."""
    X, y = _check_features(X), np.asarray(y)
    if y.ndim != 1 or len(y) != len(X) or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"y must be {len(X)} integer class codes, got {y.dtype} {y.shape}")
    missing = sorted(set(range(n_classes)) - set(y.tolist()))
    if missing or y.min() < 0 or y.max() >= n_classes:
        raise InputError(f"y must hold every class code 0..{n_classes - 1} and no other (missing {missing})")
    _, group_of_row = metrics.group_index(np.arange(len(y)) if groups is None else groups, len(y))
    return X, y, group_of_row


def _check_training_data(X, y, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = _check_features(X)
    y = metrics.check_labels(y, "y")
    if len(y) != len(X):
        raise InputError(f"y has {len(y)} labels but features have {len(X)} rows")
    if y.min() == y.max():
        raise InputError(f"y holds only class {y[0]}; training a classifier needs both 0 and 1")
    _, group_of_row = metrics.group_index(np.arange(len(y)) if groups is None else groups, len(y))
    return X, y, group_of_row


def _oof_prob(model: BaseEstimator, X: np.ndarray, y: np.ndarray, folds: list) -> np.ndarray:
    """Out-of-fold positive-class probabilities: a clone of unfitted ``model`` fitted on each fold's training rows."""
    oof = np.empty(len(y))
    for train, test in folds:
        oof[test] = clone(model).fit(X[train], y[train]).predict_proba(X[test])[:, 1]
    return oof


def _oof_class_prob(model: BaseEstimator, X: np.ndarray, y: np.ndarray, folds: list, n_classes: int) -> np.ndarray:
    """Out-of-fold class probabilities [n, K] (a class absent from a fold's training rows gets probability 0)."""
    oof = np.zeros((len(y), n_classes))
    for train, test in folds:
        fitted = clone(model).fit(X[train], y[train])
        oof[np.ix_(test, fitted.classes_)] = fitted.predict_proba(X[test])
    return oof


def _cv_score(y: np.ndarray, oof: np.ndarray, folds: list, scoring: str, threshold_criterion: str) -> float:
    fold_scores = []
    for train, test in folds:
        threshold = metrics.choose_threshold(y[train], oof[train], threshold_criterion)
        score = metrics.binary_metrics(y[test], oof[test], threshold)[scoring]
        if score is not None:
            fold_scores.append(score)
    return float(np.mean(fold_scores)) if fold_scores else float("nan")
