"""A saved fusion model is a folder: backbones, fusion and classifier in formats that run no code on load.

::

    bundle/
      backbones/<name>.keras    fine-tuned flat backbones (loaded with safe_mode=True)
      backbones/<name>.onnx     optional: the backbone's feature sub-model for ONNX Runtime (a graph, no code),
                                checked against Keras when converted; features run through it when present
      fusion.skops              the fitted FeatureFusion (step "fusion" of the bundle's estimator)
      classifier.skops          the fitted classifier (step "clf"), every XGBoost model in it replaced by a marker
      xgboost/<i>.json          constructor parameters of XGBoost model i
      xgboost/<i>.ubj           its booster in XGBoost's own format (when fitted)
      ood.npz                   optional: the out-of-distribution calibration on the training split's features
                                (`tlfusion.ood`; plain arrays, read without pickles); older bundles have none
      calibration.npz           optional: the recalibration of the classifier's probabilities (`evaluate.calibration`;
                                `tlfusion.calibration`, plain arrays); `threshold` is then on the recalibrated scale
      bundle.json               class names, threshold, image size, clahe, flip, backbone order, meta; a K-class
                                bundle (K >= 3) adds "task": "multiclass" and "ordinal", its threshold is null
                                (the most probable class is predicted); a binary bundle has neither key
      manifest.json             versions and the sha256 of every other file
      signature.json            optional: HMAC-SHA256 of manifest.json under the user's key (`tlfusion.signing`)

The fusion and classifier files are written and read by `tlfusion.estimator_files`: skops with an allow-list,
XGBoost models in their own format.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import skops.io
from sklearn.pipeline import Pipeline

from tlfusion import __version__
from tlfusion.backbones import FEATURES_LAYER, image_size_of, load_model_file
from tlfusion.calibration import Calibrator, load_calibrator
from tlfusion.classifiers import CLASSIFIER_STEP, FUSION_STEP, fusion_pipeline
from tlfusion.data.images import decoded_batches, file_sha256
from tlfusion.errors import InputError
from tlfusion.estimator_files import (
    cut_out_xgboost,
    dump_skops,
    load_skops,
    load_xgboost,
    parse_json,
    put_back_xgboost,
    read_bytes,
    read_json_file,
    save_xgboost,
    write_json_file,
)
from tlfusion.feature_runners import flip_averaged, keras_runner
from tlfusion.features import FeatureFusion, fuse
from tlfusion.onnx_graphs import BatchRunner, onnx_runner
from tlfusion.ood import FeatureDistance, load_feature_distance
from tlfusion.signing import SIGNATURE, check_signature, write_signature

logger = logging.getLogger(__name__)

FORMAT = "tlfusion-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INFO = "bundle.json"
OOD = "ood.npz"
CALIBRATION = "calibration.npz"
PREDICT_BATCH = 64
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
_OPTIONAL_INFO_TYPES: dict[str, type] = {"flip": bool, "ordinal": bool}
MULTICLASS = "multiclass"
"""bundle.json's `task` for a K-class bundle (binary bundles have no `task`)."""
"""bundle.json keys that bundles written before them lack (read as the Bundle field's default)."""


@dataclass
class Bundle:
    """Everything needed to go from images to class probabilities: backbones, then `estimator`, the fitted
    `classifiers.fusion_pipeline` (feature fusion + classifier, as cross-validated and refitted by the fit stage).

    `onnx_graphs` maps backbone names to their feature sub-model as ONNX (see `onnx_graphs.onnx_graph`); those
    backbones run with ONNX Runtime, the others with Keras. `ood` scores how unlike the training images an image's
    features are (None in bundles saved without it). `calibration` recalibrates the estimator's probabilities (None:
    used as they are). `trust` is set by `load_bundle`: "signed ..." or
    "integrity only ..." (see `tlfusion.signing`).
    """

    models: dict[str, keras.Model]
    estimator: Pipeline
    threshold: float | None
    """Binary: P(positive) at or above it is positive. K-class: None (the most probable class is predicted)."""
    class_names: list[str]
    image_size: int
    clahe: bool = False
    flip: bool = False
    meta: dict = field(default_factory=dict)
    onnx_graphs: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    ood: FeatureDistance | None = field(default=None, repr=False, compare=False)
    calibration: Calibrator | None = field(default=None, repr=False, compare=False)
    ordinal: bool = False
    """K-class bundles: the classes are ordered grades."""
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
        self._check_classes()
        unknown = sorted(set(self.onnx_graphs) - set(self.models))
        if unknown:
            raise InputError(f"bundle: ONNX graphs for unknown backbones {unknown}")
        steps = [name for name, _ in getattr(self.estimator, "steps", [])]
        if not isinstance(self.estimator, Pipeline) or steps != [FUSION_STEP, CLASSIFIER_STEP]:
            raise InputError(f"bundle: the estimator must be a Pipeline of {FUSION_STEP!r} and {CLASSIFIER_STEP!r}")
        width = getattr(self.fusion, "n_features_in_", None)
        if self.ood is not None and len(self.ood.center) != width:
            raise InputError(
                f"bundle: out-of-distribution calibration for {len(self.ood.center)} features, not {width}"
            )

    def _check_classes(self) -> None:
        """Binary: [negative, positive], a threshold in [0, 1] and a classifier of labels 0, 1. K-class: K >= 3
        distinct names, no threshold, a classifier of codes 0..K-1."""
        names, K = self.class_names, len(self.class_names)
        if K == 2:
            if self.threshold is None or not 0.0 <= float(self.threshold) <= 1.0:
                raise InputError(f"bundle: threshold must be in [0, 1]; got {self.threshold}")
        elif K < 2 or len(set(names)) != K:
            raise InputError(f"bundle: class_names must be [negative, positive] or K >= 3 distinct names; got {names}")
        elif self.threshold is not None:
            raise InputError(f"bundle: a {K}-class bundle predicts the most probable class; its threshold must be None")
        if self.ordinal and K == 2:
            raise InputError("bundle: ordinal is for bundles of 3 or more classes")
        if list(getattr(self.classifier, "classes_", [])) != list(range(K)):
            what = "labels 0 (negative) and 1 (positive)" if K == 2 else f"class codes 0..{K - 1}"
            raise InputError(f"bundle: the classifier must be fitted on {what}")

    @property
    def task(self) -> str:
        """ "binary" or "multiclass"."""
        return "binary" if len(self.class_names) == 2 else MULTICLASS

    @property
    def fusion(self) -> FeatureFusion:
        return self.estimator.named_steps[FUSION_STEP]

    @property
    def classifier(self) -> Any:
        return self.estimator.named_steps[CLASSIFIER_STEP]

    def features(self, images: np.ndarray) -> np.ndarray:
        """The backbones' features of images [n, s, s, 1] (float, [0, 255]) side by side: the estimator's input."""
        images = self._check_images(images)
        X, _ = fuse([self._backbone_features(name, images) for name in self.models])
        return X

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [n, K] in `class_names` order ((negative, positive) when binary) for images [n, s, s, 1]."""
        return self.probabilities(self.features(images))

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        """The estimator's probabilities [n, K] for features X (`features`), recalibrated when the bundle is."""
        prob = self.estimator.predict_proba(X)
        return prob if self.calibration is None else self.calibration.apply(prob)

    def assess(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`predict_proba` and each image's out-of-distribution score (`ood.FeatureDistance.score`: above 1, further
        from the training images than 99 % of them), or None when the bundle has no calibration."""
        X = self.features(images)
        return self.probabilities(X), None if self.ood is None else self.ood.score(X)

    def predict_paths(self, paths: Sequence[str | Path], batch_size: int = 32) -> np.ndarray:
        """Probabilities [n, K] for image files (decoded as the bundle's backbones expect)."""
        return np.concatenate([self.predict_proba(batch) for batch in self._decoded(paths, batch_size)])

    def assess_paths(self, paths: Sequence[str | Path], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """`assess` for image files."""
        prob, scores = zip(*(self.assess(batch) for batch in self._decoded(paths, batch_size)), strict=True)
        return np.concatenate(prob), None if self.ood is None else np.concatenate(scores)

    def _decoded(self, paths: Sequence[str | Path], batch_size: int) -> Iterator[np.ndarray]:
        if len(paths) == 0:
            raise InputError("paths: no images to predict")
        return decoded_batches(paths, self.image_size, self.clahe, batch_size)

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
    """Raise InputError unless `names` ([negative, positive], or K classes in order) are the bundle's class names."""
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
    classifier, xgb_models = cut_out_xgboost(bundle.classifier)
    dump_skops(bundle.fusion, folder / "fusion.skops", "fusion")
    dump_skops(classifier, folder / "classifier.skops", "classifier")
    for i, model in enumerate(xgb_models):
        save_xgboost(model, folder / "xgboost", i)
    if bundle.ood is not None:
        bundle.ood.save(folder / OOD)
    if bundle.calibration is not None:
        bundle.calibration.save(folder / CALIBRATION)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbones": list(bundle.models),
        "class_names": [str(name) for name in bundle.class_names],
        "threshold": None if bundle.threshold is None else float(bundle.threshold),
        "image_size": int(bundle.image_size),
        "clahe": bool(bundle.clahe),
        "flip": bool(bundle.flip),
        "xgboost_models": len(xgb_models),
        "meta": bundle.meta,
    }
    if bundle.task == MULTICLASS:  # binary bundles keep the format older tlfusion versions read
        info |= {"task": MULTICLASS, "ordinal": bool(bundle.ordinal)}
    write_json_file(folder / INFO, info, "bundle meta")
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    manifest = {
        "versions": _versions(),
        "files": {path.relative_to(folder).as_posix(): file_sha256(path) for path in files},
    }
    write_json_file(folder / MANIFEST, manifest, "manifest")
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
    raw = read_bytes(folder / MANIFEST)
    trust = check_signature(folder, raw)
    manifest = parse_json(folder / MANIFEST, raw)
    listed = _Listed(folder, _manifest_files(folder / MANIFEST, manifest.get("files")))
    _verify_files(folder, listed.files)
    _warn_on_other_versions(folder, manifest.get("versions", {}))
    info = _read_info(listed(INFO))
    names = info["backbones"]
    logger.info("bundle %s: %s", folder, trust)
    xgb_models = [load_xgboost(listed, i) for i in range(info["xgboost_models"])]
    return Bundle(
        models={name: load_model_file(listed(f"backbones/{name}.keras")) for name in names},
        estimator=fusion_pipeline(
            load_skops(listed("fusion.skops")),
            put_back_xgboost(load_skops(listed("classifier.skops")), xgb_models),
        ),
        threshold=info["threshold"],
        class_names=info["class_names"],
        image_size=info["image_size"],
        clahe=info["clahe"],
        flip=info.get("flip", False),
        meta=info["meta"],
        onnx_graphs={name: listed(f"backbones/{name}.onnx").read_bytes() for name in names if listed.has_onnx(name)},
        ood=load_feature_distance(listed(OOD)) if OOD in listed.files else None,
        calibration=load_calibrator(listed(CALIBRATION)) if CALIBRATION in listed.files else None,
        ordinal=info.get("ordinal", False),
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
    info = read_json_file(path)
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: not a {FORMAT} version {FORMAT_VERSION}")
    missing = [key for key in _INFO_TYPES if key not in info]
    if missing:
        raise InputError(f"{path}: missing key {missing[0]!r}")
    if info.get("task", MULTICLASS) != MULTICLASS:
        raise InputError(f"{path}: unknown task {info['task']!r} (a binary bundle has no 'task')")
    types = _INFO_TYPES | _OPTIONAL_INFO_TYPES
    if info.get("task") == MULTICLASS and info["threshold"] is None:
        types = {key: kind for key, kind in types.items() if key != "threshold"}
    for key, kind in types.items():
        value = info.get(key)
        if key in info and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            raise InputError(f"{path}: {key} has the wrong type ({type(value).__name__})")
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
