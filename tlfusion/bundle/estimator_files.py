"""Fitted estimators as files that run no code on load: skops with an allow-list of types, and every XGBoost
model cut out of the estimator tree (alone, inside a Pipeline, or a VotingClassifier member) and saved with
XGBoost's own `save_model` (loading them through skops would mean trusting the Booster's pickle state).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import skops.io
from sklearn.base import BaseEstimator
from skops.io.exceptions import UntrustedTypesFoundException
from xgboost import XGBClassifier, XGBModel
from xgboost.core import XGBoostError

from tlfusion.errors import InputError

TRUSTED_TYPES = [
    "sklearn.calibration._CalibratedClassifier",  # svm: CalibratedClassifierCV internals
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.tree._tree.Tree",  # rf
    "sklearn.metrics._dist_metrics.EuclideanDistance64",  # knn
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.utils._bunch.Bunch",  # vote: VotingClassifier.named_estimators_
    "tlfusion.features.fusion.FeatureFusion",
    "tlfusion.features.FeatureFusion",  # its path in bundles saved before the package layout
]
"""Types beyond skops' default trusted sklearn/numpy types that the classifier registry and fusion produce."""
_XGB_MARKER = "tlfusion:xgboost-model:"


def dump_skops(estimator: Any, path: Path, what: str) -> None:
    """Write `estimator` with skops, refusing types outside `TRUSTED_TYPES`."""
    data = skops.io.dumps(estimator)
    refused = sorted(set(skops.io.get_untrusted_types(data=data)) - set(TRUSTED_TYPES))
    if refused:
        raise InputError(f"{what}: holds types a bundle does not carry: {', '.join(refused)}")
    path.write_bytes(data)


def load_skops(path: Path) -> Any:
    """Load a skops file trusting only `TRUSTED_TYPES` beyond skops' defaults."""
    try:
        return skops.io.load(path, trusted=TRUSTED_TYPES)
    except UntrustedTypesFoundException as error:
        raise InputError(f"{path}: holds types outside tlfusion's allow-list ({error})") from None
    except Exception as error:  # a pickle, a truncated zip or a bad schema: all mean "not a skops file we wrote"
        raise InputError(f"{path}: not a readable skops file ({type(error).__name__}: {error})") from None


def save_xgboost(model: XGBModel, folder: Path, index: int) -> None:
    """`folder`/<index>.json (constructor parameters) and, when fitted, <index>.ubj (its booster)."""
    if type(model) is not XGBClassifier:
        raise InputError(f"classifier: {type(model).__name__} is not an XGBClassifier; a bundle cannot carry it")
    folder.mkdir(exist_ok=True)
    fitted = model.__sklearn_is_fitted__()
    write_json_file(folder / f"{index}.json", {"params": model.get_params(), "fitted": fitted}, "XGBoost parameters")
    if fitted:
        model.save_model(folder / f"{index}.ubj")


def load_xgboost(listed: Callable[[str], Path], index: int) -> XGBClassifier:
    """XGBoost model `index` from `listed("xgboost/<index>.json")` and, when fitted, its booster file."""
    path = listed(f"xgboost/{index}.json")
    spec = read_json_file(path)
    if not isinstance(spec.get("params"), dict) or not isinstance(spec.get("fitted"), bool):
        raise InputError(f"{path}: needs 'params' (an object) and 'fitted' (true or false)")
    model = XGBClassifier(**spec["params"])
    if spec["fitted"]:
        booster = listed(f"xgboost/{index}.ubj")
        try:
            model.load_model(booster)
        except (XGBoostError, UnicodeError) as error:  # XGBoost's message may quote the file's bytes: not shown
            raise InputError(f"{booster}: not an XGBoost model file ({type(error).__name__})") from None
    return model


def cut_out_xgboost(estimator: Any) -> tuple[Any, list[XGBModel]]:
    """A copy of the estimator tree with each XGBoost model replaced by a marker string, and those models."""
    models: list[XGBModel] = []

    def cut(leaf):
        if not isinstance(leaf, XGBModel):
            return leaf
        models.append(leaf)
        return f"{_XGB_MARKER}{len(models) - 1}"

    return _map_tree(estimator, cut, {}), models


def put_back_xgboost(estimator: Any, models: list[XGBClassifier]) -> Any:
    def put_back(leaf):
        if isinstance(leaf, str) and leaf.startswith(_XGB_MARKER):
            return models[int(leaf.removeprefix(_XGB_MARKER))]
        return leaf

    return _map_tree(estimator, put_back, {})


def _map_tree(node: Any, replace: Callable[[Any], Any], memo: dict[int, Any]) -> Any:
    """Copy an estimator tree (sklearn objects, lists, tuples, dicts) with nodes swapped by `replace`.

    Objects shared inside the tree (VotingClassifier's `estimators_` and `named_estimators_`) stay shared.
    """
    if id(node) in memo:
        return memo[id(node)]
    replaced = replace(node)
    if replaced is not node:
        result = replaced
    elif isinstance(node, (list, tuple)):
        result = type(node)(_map_tree(item, replace, memo) for item in node)
    elif isinstance(node, dict):
        result = type(node)()
        result.update({key: _map_tree(value, replace, memo) for key, value in node.items()})
    elif _is_sklearn_object(node):
        result = object.__new__(type(node))
        memo[id(node)] = result
        result.__dict__.update({key: _map_tree(value, replace, memo) for key, value in vars(node).items()})
    else:
        result = node
    memo[id(node)] = result
    return result


def _is_sklearn_object(node: Any) -> bool:
    return hasattr(node, "__dict__") and (
        isinstance(node, BaseEstimator) or type(node).__module__.startswith("sklearn.")
    )


def write_json_file(path: Path, content: dict, what: str) -> None:
    """`content` as sorted, indented JSON (InputError naming `what` when it cannot be)."""
    try:
        text = json.dumps(content, indent=1, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise InputError(f"{what}: not JSON-serialisable ({error})") from None
    path.write_text(text + "\n")


def read_json_file(path: Path) -> dict:
    """A JSON object from `path` (InputError naming it otherwise)."""
    return parse_json(path, read_bytes(path))


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: unreadable ({error.strerror or error})") from None


def parse_json(path: Path, data: bytes) -> dict:
    try:
        content = json.loads(data.decode("utf-8"))
    except ValueError as error:
        raise InputError(f"{path}: unreadable JSON ({error})") from None
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a JSON object, not {type(content).__name__}")
    return content
