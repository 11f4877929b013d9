"""Reading back what earlier stages wrote into a run folder, checked: a file that is missing, not a regular file,
unreadable or malformed raises InputError naming it.

The pipeline runs these readers before it skips a stage as unchanged (each stage's `check` in the registry): a damaged
output makes the stage that wrote it run again, so a run folder's outputs behave like a cache.
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from tlfusion.errors import InputError
from tlfusion.run.paths import RunPaths

PREDICTION_COLUMNS = ("model", "split", "path", "patient", "study", "y_true", "prob")
_SELECTION_KEYS = ("selected", "scoring", "cv", "cv_scores", "thresholds")


def check_regular(path: Path) -> None:
    """InputError unless `path` is a regular file (never open a FIFO, device or folder)."""
    if not path.is_file():
        raise InputError(f"{path}: {'not a regular file' if path.exists() else 'missing'}")


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object."""
    check_regular(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable JSON ({type(error).__name__})") from None
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a JSON object, not {type(content).__name__}")
    return content


def _with_keys(path: Path, keys) -> dict:
    """The JSON object at `path`, InputError when it lacks any of `keys`."""
    content = read_json_object(path)
    missing = [key for key in keys if key not in content]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(missing)}")
    return content


def read_selection(paths: RunPaths) -> dict:
    """fit/selection.json: the selected model, CV scores and a threshold in [0, 1] for every model."""
    path, selection = paths.selection, _with_keys(paths.selection, _SELECTION_KEYS)
    thresholds = selection["thresholds"]
    if not isinstance(thresholds, dict) or not all(_is_probability(value) for value in thresholds.values()):
        raise InputError(f"{path}: 'thresholds' must map model names to numbers in [0, 1]")
    if selection["selected"] not in thresholds:
        raise InputError(f"{path}: 'selected' must name a model in 'thresholds'")
    return selection


def read_predictions(paths: RunPaths, models: set[str]) -> pd.DataFrame:
    """fit/predictions.csv: one row per model, split and image with a label 0/1 and a probability in [0, 1]."""
    path = paths.predictions
    frame = _prediction_table(path, PREDICTION_COLUMNS)
    prob = pd.to_numeric(frame["prob"], errors="coerce")
    if frame.empty or not prob.between(0, 1).all() or not frame["y_true"].isin([0, 1]).all():
        raise InputError(f"{path}: needs rows with y_true 0 or 1 and prob in [0, 1]")
    _check_models(paths, frame, models)
    return frame


def _prediction_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """fit/predictions.csv read (identifiers as text) with every one of `columns`."""
    check_regular(path)
    text_columns = {"model": str, "split": str, "path": str, "patient": str, "study": str}
    try:
        frame = pd.read_csv(path, dtype=text_columns)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable CSV ({type(error).__name__})") from None
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def _check_models(paths: RunPaths, frame: pd.DataFrame, models: set[str]) -> None:
    unknown = sorted(set(frame["model"]) - models)
    if unknown:
        selection = paths.selection.relative_to(paths.root)
        raise InputError(f"{paths.predictions}: model(s) {unknown[:3]} not in {selection}")


def prediction_rows(rows: pd.DataFrame, model: str, split: str, prob: np.ndarray) -> pd.DataFrame:
    """fit/predictions.csv rows (`PREDICTION_COLUMNS`) of one model on one split: table `rows` and their `prob`."""
    return pd.DataFrame(
        {
            "model": model,
            "split": split,
            "path": rows["path"].to_numpy(),
            "patient": rows["patient"].astype(str).to_numpy(),
            "study": rows["study"].astype(str).to_numpy(),
            "y_true": rows["y"].to_numpy(),
            "prob": prob,
        }
    )


CLASS_SELECTION_KEYS = ("selected", "scoring", "cv", "cv_scores", "classes")


def class_columns(n_classes: int) -> list[str]:
    """The probability columns of a multiclass run's fit/predictions.csv: prob_0 ... prob_<K-1> (class codes)."""
    return [f"prob_{code}" for code in range(n_classes)]


def read_class_selection(paths: RunPaths) -> dict:
    """A multiclass run's fit/selection.json: the selected model among the CV-scored ones, and the classes."""
    path, selection = paths.selection, _with_keys(paths.selection, CLASS_SELECTION_KEYS)
    classes = selection["classes"]
    if not isinstance(classes, list) or len(classes) < 3 or not all(isinstance(name, str) for name in classes):
        raise InputError(f"{path}: 'classes' must list at least 3 class names")
    if not isinstance(selection["cv_scores"], dict) or selection["selected"] not in selection["cv_scores"]:
        raise InputError(f"{path}: 'selected' must name a model in 'cv_scores'")
    return selection


def read_class_predictions(paths: RunPaths, models: set[str], n_classes: int) -> pd.DataFrame:
    """A multiclass run's fit/predictions.csv: class codes 0..K-1 and a probability row summing to 1 per image."""
    path = paths.predictions
    frame = _prediction_table(path, (*PREDICTION_COLUMNS[:-1], *class_columns(n_classes)))
    prob = frame[class_columns(n_classes)].apply(pd.to_numeric, errors="coerce").to_numpy()
    sums_to_one = np.isfinite(prob).all() and (prob >= 0).all() and np.allclose(prob.sum(axis=1), 1, atol=1e-4)
    if frame.empty or not sums_to_one or not frame["y_true"].isin(range(n_classes)).all():
        raise InputError(f"{path}: needs rows with y_true 0..{n_classes - 1} and probabilities summing to 1")
    unknown = sorted(set(frame["model"]) - models)
    if unknown:
        raise InputError(f"{path}: model(s) {unknown[:3]} not in {paths.selection.relative_to(paths.root)}")
    return frame


def class_prediction_rows(rows: pd.DataFrame, model: str, split: str, prob: np.ndarray) -> pd.DataFrame:
    """A multiclass run's fit/predictions.csv rows of one model on one split: table `rows`, their class codes `y`
    and probabilities `prob` [n, K]."""
    frame = prediction_rows(rows, model, split, np.zeros(len(rows))).drop(columns="prob")
    return frame.assign(**dict(zip(class_columns(prob.shape[1]), prob.T, strict=True)))


def read_features(path: Path, rows: int) -> np.ndarray:
    """A cached feature block: a float array [rows, d] in a plain `.npy` (pickled objects are refused, not loaded)."""
    check_regular(path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a plain numeric array ({type(error).__name__})") from None
    if array.ndim != 2 or array.dtype.kind != "f" or len(array) != rows:
        raise InputError(f"{path}: expected float features [{rows}, d], found {array.dtype} {array.shape}")
    return np.asarray(array)


def check_keras_file(path: Path) -> None:
    """A `.keras` model file that is complete: a zip archive whose every member passes its CRC check, holding the
    model's config.json (read, not deserialised; that is `backbones.registry.load_model_file`'s job)."""
    check_regular(path)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged, names = archive.testzip(), archive.namelist()
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise InputError(f"{path}: not a complete Keras model file ({type(error).__name__})") from None
    if damaged is not None or "config.json" not in names:
        raise InputError(f"{path}: not a complete Keras model file ({damaged or 'no config.json'} damaged)")


def _is_probability(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1 and math.isfinite(value)
