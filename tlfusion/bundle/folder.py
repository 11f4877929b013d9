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
                                (`tlfusion.bundle.ood`; plain arrays, read without pickles); older bundles have none
      calibration.npz           optional: the recalibration of the classifier's probabilities (`evaluate.calibration`;
                                `tlfusion.evaluation.calibration`, plain arrays); `threshold` is then on the
                                recalibrated scale
      bundle.json               class names, threshold, image size, clahe, flip, backbone order, meta; a K-class
                                bundle (K >= 3) adds "task": "multiclass" and "ordinal", its threshold is null
                                (the most probable class is predicted); a binary bundle has neither key
      manifest.json             versions and the sha256 of every other file
      signature.json            optional: HMAC-SHA256 of manifest.json under the user's key (`tlfusion.bundle.signing`)

The fusion and classifier files are written and read by `tlfusion.bundle.estimator_files`: skops with an allow-list,
XGBoost models in their own format.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import skops.io

from tlfusion import __version__
from tlfusion.backbones.registry import load_model_file
from tlfusion.bundle.estimator_files import (
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
from tlfusion.bundle.model import MULTICLASS, Bundle, check_backbone_name
from tlfusion.bundle.ood import load_feature_distance
from tlfusion.bundle.signing import SIGNATURE, check_signature, write_signature
from tlfusion.data.images import file_sha256
from tlfusion.errors import InputError
from tlfusion.evaluation.calibration import load_calibrator
from tlfusion.models.classifiers import fusion_pipeline

logger = logging.getLogger(__name__)

FORMAT = "tlfusion-bundle"


FORMAT_VERSION = 1


MANIFEST = "manifest.json"


INFO = "bundle.json"


OOD = "ood.npz"


CALIBRATION = "calibration.npz"


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

    With `TLFUSION_BUNDLE_KEY` set, the manifest's signature is checked first (`tlfusion.bundle.signing`). Every file is
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
