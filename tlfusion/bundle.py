"""A saved fusion model is a folder: backbones, fusion and classifier in formats that run no code on load.

::

    bundle/
      backbones/<name>.keras    fine-tuned flat backbones (loaded with safe_mode=True)
      backbones/<name>.onnx     optional: the backbone's feature sub-model for ONNX Runtime (a graph, no code),
                                checked against Keras when converted; features run through it when present
      fusion.skops              the fitted FeatureFusion
      classifier.skops          the fitted classifier, every XGBoost model in it replaced by a marker string
      xgboost/<i>.json          constructor parameters of XGBoost model i
      xgboost/<i>.ubj           its booster in XGBoost's own format (when fitted)
      bundle.json               class names, threshold, image size, clahe, backbone order, meta
      manifest.json             versions and the sha256 of every other file
      signature.json            optional: HMAC-SHA256 of manifest.json under the user's key (`tlfusion.signing`)

skops loads only the types in `TRUSTED_TYPES` beyond its own defaults. XGBoost models are kept out of skops
(loading them through it would mean trusting the Booster's pickle state): they are cut out of the estimator tree
wherever they sit (alone, inside a Pipeline, or a VotingClassifier member) and saved with XGBoost's own
`save_model`; loading puts them back where the markers are.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import skops.io
from sklearn.base import BaseEstimator
from skops.io.exceptions import UntrustedTypesFoundException
from xgboost import XGBClassifier, XGBModel
from xgboost.core import XGBoostError

from tlfusion import __version__
from tlfusion.backbones import FEATURES_LAYER, image_size_of, load_model_file
from tlfusion.data.images import decoded_batches, file_sha256
from tlfusion.errors import InputError
from tlfusion.features import BatchRunner, FeatureFusion, flip_averaged, fuse, keras_runner, onnx_runner
from tlfusion.signing import SIGNATURE, check_signature, write_signature

logger = logging.getLogger(__name__)

FORMAT = "tlfusion-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INFO = "bundle.json"
PREDICT_BATCH = 64
TRUSTED_TYPES = [
    "sklearn.calibration._CalibratedClassifier",  # svm: CalibratedClassifierCV internals
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.tree._tree.Tree",  # rf
    "sklearn.metrics._dist_metrics.EuclideanDistance64",  # knn
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.utils._bunch.Bunch",  # vote: VotingClassifier.named_estimators_
    "tlfusion.features.FeatureFusion",
]
"""Types beyond skops' default trusted sklearn/numpy types that the classifier registry and fusion produce."""
_XGB_MARKER = "tlfusion:xgboost-model:"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_INFO_TYPES: dict[str, type | tuple[type, ...]] = {
    "backbones": list,
    "class_names": list,
    "threshold": (int, float),
    "image_size": int,
    "clahe": bool,
    "xgboost_models": int,
    "meta": dict,
}
"""bundle.json keys beyond format and format_version, and the JSON types their values must have."""


@dataclass
class Bundle:
    """Everything needed to go from images to the probability of the positive class.

    `onnx_graphs` maps backbone names to their feature sub-model as ONNX (see `features.onnx_graph`); those
    backbones run with ONNX Runtime, the others with Keras. `trust` is set by `load_bundle`: "signed ..." or
    "integrity only ..." (see `tlfusion.signing`).
    """

    models: dict[str, keras.Model]
    fusion: FeatureFusion
    classifier: Any
    threshold: float
    class_names: list[str]
    image_size: int
    clahe: bool = False
    flip: bool = False
    meta: dict = field(default_factory=dict)
    onnx_graphs: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    trust: str = field(default="", compare=False)
    _runners: dict[str, BatchRunner] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.models:
            raise InputError("bundle: needs at least one backbone")
        for name, model in self.models.items():
            check_backbone_name(name, "bundle")
            if FEATURES_LAYER not in {layer.name for layer in model.layers}:
                raise InputError(f"bundle: backbone {name!r} has no '{FEATURES_LAYER}' layer")
            if image_size_of(model) != self.image_size:
                raise InputError(f"bundle: backbone {name!r} takes {image_size_of(model)} px, not {self.image_size}")
        if len(self.class_names) != 2:
            raise InputError(f"bundle: class_names must be [negative, positive]; got {self.class_names}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise InputError(f"bundle: threshold must be in [0, 1]; got {self.threshold}")
        unknown = sorted(set(self.onnx_graphs) - set(self.models))
        if unknown:
            raise InputError(f"bundle: ONNX graphs for unknown backbones {unknown}")
        if list(getattr(self.classifier, "classes_", [])) != [0, 1]:
            raise InputError("bundle: the classifier must be fitted on labels 0 (negative) and 1 (positive)")

    def features(self, images: np.ndarray) -> np.ndarray:
        """Fused, normalised features of images [n, s, s, 1] (float, [0, 255])."""
        images = self._check_images(images)
        X, _ = fuse([self._backbone_features(name, images) for name in self.models])
        return self.fusion.transform(X)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Probability of the positive class for each of images [n, s, s, 1]."""
        return self.classifier.predict_proba(self.features(images))[:, 1]

    def predict_paths(self, paths: Sequence[str | Path], batch_size: int = 32) -> np.ndarray:
        """Probability of the positive class for each image file (decoded as the bundle's backbones expect)."""
        if len(paths) == 0:
            raise InputError("paths: no images to predict")
        batches = decoded_batches(paths, self.image_size, self.clahe, batch_size)
        return np.concatenate([self.predict_proba(batch) for batch in batches])

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[-1] != 1:
            raise InputError(f"images must be [n, size, size, 1]; got shape {images.shape}")
        if images.shape[1:3] != (self.image_size, self.image_size):
            size = images.shape[1] if images.shape[1] == images.shape[2] else f"{images.shape[1]}x{images.shape[2]}"
            raise InputError(f"image size {size} differs from the bundle's {self.image_size}")
        return images

    def _backbone_features(self, name: str, images: np.ndarray) -> np.ndarray:
        if name not in self._runners:
            graph = self.onnx_graphs.get(name)
            run, size = onnx_runner(graph) if graph else keras_runner(self.models[name])
            if size != self.image_size:
                raise InputError(f"bundle: backbone {name!r} ONNX graph takes {size} px, not {self.image_size}")
            self._runners[name] = flip_averaged(run) if self.flip else run
        run = self._runners[name]
        return np.concatenate([run(images[i : i + PREDICT_BATCH]) for i in range(0, len(images), PREDICT_BATCH)])


def check_backbone_name(name: Any, where: str) -> None:
    """Raise InputError unless `name` can name files in a bundle: letters, digits, '_', '-', '.', no '..'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InputError(f"{where}: backbone name {name!r} must be letters, digits, '_', '-' or '.' (no '..')")


def check_class_names(bundle: Bundle, names: Sequence[str]) -> None:
    """Raise InputError unless `names` ([negative, positive]) are the bundle's class names."""
    if list(names) != list(bundle.class_names):
        raise InputError(f"data classes {list(names)} differ from the bundle's {bundle.class_names}")


def save_bundle(bundle: Bundle, folder: str | Path) -> Path:
    """Write `bundle` to `folder` (replacing a bundle there) through a temporary folder renamed into place."""
    target = Path(folder)
    if target.exists() and not (target / MANIFEST).is_file() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"{target}: exists and is not a tlfusion bundle; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        staging.chmod(0o755)
        _write_contents(bundle, staging)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write_contents(bundle: Bundle, folder: Path) -> None:
    (folder / "backbones").mkdir()
    for name, model in bundle.models.items():
        model.save(folder / "backbones" / f"{name}.keras")
    for name, graph in bundle.onnx_graphs.items():
        (folder / "backbones" / f"{name}.onnx").write_bytes(graph)
    classifier, xgb_models = _cut_out_xgboost(bundle.classifier)
    _dump_skops(bundle.fusion, folder / "fusion.skops", "fusion")
    _dump_skops(classifier, folder / "classifier.skops", "classifier")
    for i, model in enumerate(xgb_models):
        _save_xgboost(model, folder / "xgboost", i)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbones": list(bundle.models),
        "class_names": [str(name) for name in bundle.class_names],
        "threshold": float(bundle.threshold),
        "image_size": int(bundle.image_size),
        "clahe": bool(bundle.clahe),
        "flip": bool(bundle.flip),
        "xgboost_models": len(xgb_models),
        "meta": bundle.meta,
    }
    _write_json(folder / INFO, info, "bundle meta")
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    manifest = {
        "versions": _versions(),
        "files": {path.relative_to(folder).as_posix(): file_sha256(path) for path in files},
    }
    _write_json(folder / MANIFEST, manifest, "manifest")
    write_signature(folder, (folder / MANIFEST).read_bytes())


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing `target` is moved aside first and removed after."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_bundle(folder: str | Path) -> Bundle:
    """Load a bundle after checking every file against its manifest (missing, altered or extra -> InputError).

    With `TLFUSION_BUNDLE_KEY` set, the manifest's signature is checked first (`tlfusion.signing`). Every file is
    opened through `_Listed`, so nothing the manifest does not list is read, and names from bundle.json are checked
    before any path is built from them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: bundle folder not found")
    if not (folder / MANIFEST).is_file():
        raise InputError(f"{folder}: not a tlfusion bundle (no {MANIFEST})")
    raw = _read_bytes(folder / MANIFEST)
    trust = check_signature(folder, raw)
    manifest = _parse_json(folder / MANIFEST, raw)
    listed = _Listed(folder, _manifest_files(folder / MANIFEST, manifest.get("files")))
    _verify_files(folder, listed.files)
    _warn_on_other_versions(folder, manifest.get("versions", {}))
    info = _read_info(listed(INFO))
    names = info["backbones"]
    logger.info("bundle %s: %s", folder, trust)
    xgb_models = [_load_xgboost(listed, i) for i in range(info["xgboost_models"])]
    return Bundle(
        models={name: load_model_file(listed(f"backbones/{name}.keras")) for name in names},
        fusion=_load_skops(listed("fusion.skops")),
        classifier=_put_back_xgboost(_load_skops(listed("classifier.skops")), xgb_models),
        threshold=info["threshold"],
        class_names=info["class_names"],
        image_size=info["image_size"],
        clahe=info["clahe"],
        flip=info.get("flip", False),
        meta=info["meta"],
        onnx_graphs={name: listed(f"backbones/{name}.onnx").read_bytes() for name in names if listed.has_onnx(name)},
        trust=trust,
    )


@dataclass
class _Listed:
    """The paths of a bundle's files, handed out only for names its manifest lists."""

    folder: Path
    files: dict[str, str]

    def __call__(self, name: str) -> Path:
        if name not in self.files:
            raise InputError(f"{self.folder / name}: not listed in the bundle's {MANIFEST}; not read")
        return self.folder / name

    def has_onnx(self, backbone: str) -> bool:
        return f"backbones/{backbone}.onnx" in self.files


def _manifest_files(path: Path, files: Any) -> dict[str, str]:
    """The manifest's `files` (relative POSIX name -> sha256), refusing other types and names that leave the bundle."""
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        raise InputError(f"{path}: 'files' must map file names to sha256 strings")
    for name in files:
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in parts):
            raise InputError(f"{path}: file name {name!r} is not a plain path inside the bundle")
    return files


def _read_info(path: Path) -> dict:
    """bundle.json, its format, keys and value types checked (backbone and class names included)."""
    info = _read_json(path)
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: not a {FORMAT} version {FORMAT_VERSION}")
    for key, kind in _INFO_TYPES.items():
        if key not in info:
            raise InputError(f"{path}: missing key {key!r}")
        value = info[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise InputError(f"{path}: {key} has the wrong type ({type(value).__name__})")
    if not isinstance(info.get("flip", False), bool):
        raise InputError(f"{path}: flip has the wrong type ({type(info['flip']).__name__})")
    for name in info["backbones"]:
        check_backbone_name(name, str(path))
    if not all(isinstance(name, str) for name in info["class_names"]):
        raise InputError(f"{path}: class_names must be strings")
    return info


def _verify_files(folder: Path, listed: dict[str, str]) -> None:
    root = folder.resolve()
    for name, digest in listed.items():
        path = folder / name
        if not path.resolve().is_relative_to(root) or path.is_symlink():
            raise InputError(f"{path}: manifest entry points outside the bundle")
        if not path.is_file():
            raise InputError(f"{path}: file listed in the manifest is missing")
        if file_sha256(path) != digest:
            raise InputError(f"{path}: file was altered (sha256 differs from the manifest)")
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if (path.is_symlink() or not path.is_dir()) and name not in (MANIFEST, SIGNATURE) and name not in listed:
            raise InputError(f"{path}: file not listed in the manifest")


def _warn_on_other_versions(folder: Path, saved: dict[str, str]) -> None:
    for package, version in _versions().items():
        if package in saved and saved[package] != version:
            logger.warning("%s: saved with %s %s, loading with %s", folder, package, saved[package], version)


def _versions() -> dict[str, str]:
    import sklearn
    import tensorflow
    import xgboost

    return {
        "tlfusion": __version__,
        "python": platform.python_version(),
        "keras": keras.__version__,
        "tensorflow": tensorflow.__version__,
        "sklearn": sklearn.__version__,
        "xgboost": xgboost.__version__,
        "skops": skops.__version__,
        "numpy": np.__version__,
    }


def _dump_skops(estimator: Any, path: Path, what: str) -> None:
    data = skops.io.dumps(estimator)
    refused = sorted(set(skops.io.get_untrusted_types(data=data)) - set(TRUSTED_TYPES))
    if refused:
        raise InputError(f"{what}: holds types a bundle does not carry: {', '.join(refused)}")
    path.write_bytes(data)


def _load_skops(path: Path) -> Any:
    try:
        return skops.io.load(path, trusted=TRUSTED_TYPES)
    except UntrustedTypesFoundException as error:
        raise InputError(f"{path}: holds types outside tlfusion's allow-list ({error})") from None
    except Exception as error:  # a pickle, a truncated zip or a bad schema: all mean "not a skops file we wrote"
        raise InputError(f"{path}: not a readable skops file ({type(error).__name__}: {error})") from None


def _save_xgboost(model: XGBModel, folder: Path, index: int) -> None:
    if type(model) is not XGBClassifier:
        raise InputError(f"classifier: {type(model).__name__} is not an XGBClassifier; a bundle cannot carry it")
    folder.mkdir(exist_ok=True)
    fitted = model.__sklearn_is_fitted__()
    _write_json(folder / f"{index}.json", {"params": model.get_params(), "fitted": fitted}, "XGBoost parameters")
    if fitted:
        model.save_model(folder / f"{index}.ubj")


def _load_xgboost(listed: _Listed, index: int) -> XGBClassifier:
    path = listed(f"xgboost/{index}.json")
    spec = _read_json(path)
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


def _cut_out_xgboost(estimator: Any) -> tuple[Any, list[XGBModel]]:
    """A copy of the estimator tree with each XGBoost model replaced by a marker string, and those models."""
    models: list[XGBModel] = []

    def cut(leaf):
        if not isinstance(leaf, XGBModel):
            return leaf
        models.append(leaf)
        return f"{_XGB_MARKER}{len(models) - 1}"

    return _map_tree(estimator, cut, {}), models


def _put_back_xgboost(estimator: Any, models: list[XGBClassifier]) -> Any:
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


def _write_json(path: Path, content: dict, what: str) -> None:
    try:
        text = json.dumps(content, indent=1, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise InputError(f"{what}: not JSON-serialisable ({error})") from None
    path.write_text(text + "\n")


def _read_json(path: Path) -> dict:
    return _parse_json(path, _read_bytes(path))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: unreadable ({error.strerror or error})") from None


def _parse_json(path: Path, data: bytes) -> dict:
    try:
        content = json.loads(data.decode("utf-8"))
    except ValueError as error:
        raise InputError(f"{path}: unreadable JSON ({error})") from None
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a JSON object, not {type(content).__name__}")
    return content
