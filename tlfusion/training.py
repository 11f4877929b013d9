"""Supervised in-domain pretraining and fine-tuning of tlfusion backbones, with per-epoch checkpoints and resume.

Both entry points take a table with the `data.sources` columns whose `split` is "train" / "val" (other rows are
ignored) and write into `out_dir`:

- `model.keras`: the best epoch (lowest val loss for pretraining, highest val AUC for fine-tuning), a plain
  float32 tlfusion backbone that `backbones.load_model_file` accepts;
- `checkpoint.keras` + `state.json`: the last finished epoch with its optimizer, for `resume=True`;
- `history.csv`, `curves.png`, `train.json` (settings, data counts, best epoch, val metrics, wall time) and
  `seen_images.txt` (sha256 of every training and validation image, for leakage checks downstream).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from tlfusion import backbones
from tlfusion.data.images import file_sha256, image_dataset
from tlfusion.errors import InputError
from tlfusion.fileio import write_atomic

CHECKPOINT = "checkpoint.keras"
STATE = "state.json"
BEST_WEIGHTS = "best.weights.h5"
MODEL = "model.keras"
SEEN_IMAGES = "seen_images.txt"
TRAINED_BATCHNORM_MOMENTUM = 0.9
SHIPPED_FILES = (MODEL, "MODEL_CARD.md", SEEN_IMAGES, "train.json", "history.csv", "curves.png")


@dataclass
class TrainResult:
    """What a training run produced: the best model file, per-epoch history, best epoch (1-based), its val metrics."""

    model_path: Path
    history: list[dict[str, Any]]
    best_epoch: int
    val_metrics: dict[str, float]


@dataclass(frozen=True)
class _Phase:
    name: str
    end_epoch: int  # epochs finished (counted from the run's start) when this phase ends
    learning_rate: float
    trainable: str  # "all", "head" (backbone frozen) or "all_but_batchnorm" (BatchNorm kept in inference mode)
    early_stopping: bool


@dataclass(frozen=True)
class _Task:
    kind: str  # "pretrain" (softmax over classes) or "finetune" (one logit)
    backbone: str
    image_size: int
    num_outputs: int
    phases: tuple[_Phase, ...]
    monitor: str
    mode: str  # "min" or "max"
    metric: str  # the metric plotted beside the loss


def pretrain(
    table: pd.DataFrame,
    backbone: str,
    out_dir: str | Path,
    *,
    weights: str | Path | None = None,
    image_size: int = 128,
    warmup_epochs: int = 0,
    epochs: int = 15,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    unfrozen_learning_rate: float | None = None,
    patience: int = 4,
    seed: int = 0,
    resume: bool = False,
    augment: bool = True,
    clahe: bool = False,
    batchnorm: str = "auto",
    options: Mapping[str, Any] | None = None,
    verbose: int = 1,
) -> TrainResult:
    """Supervised pretraining: softmax over every `label` in the training rows, class-weighted.

    `weights`: None (random init), "imagenet" or a tlfusion model file to continue from. The first
    `warmup_epochs` train the new head alone at `learning_rate`, the rest everything at `unfrozen_learning_rate`
    (default: `learning_rate`); `batchnorm` as in `finetune`. Early stopping on val loss after `patience` epochs
    without improvement (after the warm-up); the best epoch becomes `model.keras`. `options` go to
    `backbones.build_backbone` (e.g. `{"alpha": 0.35}`).
    """
    train, val = _train_val(table)
    classes = sorted(train["label"].astype(str).unique())
    _require_classes(classes, val, "pretrain")
    index = {name: i for i, name in enumerate(classes)}
    phases = _phases(weights, warmup_epochs, epochs, learning_rate, unfrozen_learning_rate or learning_rate, batchnorm)
    task = _Task(
        kind="pretrain",
        backbone=_architecture(backbone),
        image_size=image_size,
        num_outputs=len(classes),
        phases=phases,
        monitor="val_loss",
        mode="min",
        metric="accuracy",
    )
    targets = (
        train["label"].astype(str).map(index).to_numpy(np.int32),
        val["label"].astype(str).map(index).to_numpy(np.int32),
    )
    settings = dict(
        weights=None if weights is None else str(weights),
        image_size=image_size,
        warmup_epochs=warmup_epochs,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        unfrozen_learning_rate=unfrozen_learning_rate or learning_rate,
        patience=patience,
        seed=seed,
        augment=augment,
        clahe=clahe,
        batchnorm=batchnorm,
        options=dict(options or {}),
    )
    return _run(task, train, val, targets, out_dir, weights, settings, {"classes": classes}, resume, verbose)


def finetune(
    table: pd.DataFrame,
    backbone: str,
    out_dir: str | Path,
    *,
    positive_class: str,
    weights: str | Path | None = None,
    image_size: int = 224,
    warmup_epochs: int = 2,
    epochs: int = 12,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    unfrozen_learning_rate: float = 1e-4,
    patience: int = 4,
    seed: int = 0,
    resume: bool = False,
    augment: bool = True,
    clahe: bool = False,
    batchnorm: str = "auto",
    options: Mapping[str, Any] | None = None,
    verbose: int = 1,
) -> TrainResult:
    """Binary fine-tuning (`positive_class` vs the rest) of a backbone initialised from `weights`.

    `weights`: None (random init), "imagenet", or a tlfusion `.keras` / `.weights.h5` file (e.g. a pretrained
    `model.keras`; its head is replaced). `epochs` counts every epoch: the first `warmup_epochs` train only the
    head at `learning_rate`, the rest train everything at `unfrozen_learning_rate`. `batchnorm`: "freeze" keeps
    BatchNorm layers in inference mode once unfrozen, "train" trains them (moving statistics re-estimated quickly),
    "auto" freezes them from pretrained weights and trains them from random init. The epoch with the best val AUC
    becomes `model.keras`; early stopping applies after the warm-up.
    """
    train, val = _train_val(table)
    labels = set(train["label"].astype(str))
    if str(positive_class) not in labels:
        raise InputError(f"finetune: positive_class {positive_class!r} is not a training label ({sorted(labels)})")
    _require_classes(sorted(labels), val, "finetune")
    if val["label"].astype(str).eq(str(positive_class)).nunique() < 2:
        raise InputError(f"finetune: the 'val' rows need both {positive_class!r} and other labels for a val AUC")
    phases = _phases(weights, warmup_epochs, epochs, learning_rate, unfrozen_learning_rate, batchnorm)
    task = _Task(
        kind="finetune",
        backbone=_architecture(backbone),
        image_size=image_size,
        num_outputs=1,
        phases=phases,
        monitor="val_auc",
        mode="max",
        metric="auc",
    )
    targets = tuple(
        (part["label"].astype(str) == str(positive_class)).to_numpy(np.float32)[:, None] for part in (train, val)
    )
    settings = dict(
        weights=None if weights is None else str(weights),
        positive_class=str(positive_class),
        image_size=image_size,
        warmup_epochs=warmup_epochs,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        unfrozen_learning_rate=unfrozen_learning_rate,
        patience=patience,
        seed=seed,
        augment=augment,
        clahe=clahe,
        batchnorm=batchnorm,
        options=dict(options or {}),
    )
    extra = {"classes": [f"not {positive_class}", str(positive_class)]}
    return _run(task, train, val, targets, out_dir, weights, settings, extra, resume, verbose)


# --- table checks -----------------------------------------------------------------------------------------------


def _train_val(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    missing = [column for column in ("path", "label", "split") if column not in table.columns]
    if missing:
        raise InputError(f"training table: missing column(s) {missing}")
    train = table[table["split"] == "train"].reset_index(drop=True)
    val = table[table["split"] == "val"].reset_index(drop=True)
    if train.empty:
        raise InputError("training table: no rows with split 'train'")
    if val.empty:
        raise InputError("training table: no rows with split 'val' (see data.splits.assign_splits)")
    return train, val


def _require_classes(classes: Sequence[str], val: pd.DataFrame, what: str) -> None:
    if len(classes) < 2:
        raise InputError(f"{what}: the training rows have only one class ({list(classes)}); need at least two")
    unseen = sorted(set(val["label"].astype(str)) - set(classes))
    if unseen:
        raise InputError(f"{what}: validation label(s) {unseen} never occur in the training rows")


def _architecture(name: str) -> str:
    """The registry name of `name` (InputError listing the known ones when unknown)."""
    backbones.get_spec(name)
    return name.lower()


def _phases(
    weights, warmup_epochs: int, epochs: int, learning_rate: float, unfrozen_learning_rate: float, batchnorm: str
) -> tuple[_Phase, ...]:
    """Head-only warm-up at `learning_rate`, then everything at `unfrozen_learning_rate` (early stopping there)."""
    if not 0 <= warmup_epochs <= _positive(epochs, "epochs"):
        raise InputError(f"training: warmup_epochs must be between 0 and epochs ({epochs}), got {warmup_epochs}")
    if batchnorm not in ("auto", "train", "freeze"):
        raise InputError(f"training: batchnorm must be 'auto', 'train' or 'freeze', got {batchnorm!r}")
    unfrozen = "all" if trains_batchnorm(batchnorm, weights) else "all_but_batchnorm"
    phases = (
        _Phase("warmup", warmup_epochs, learning_rate, "head", False),
        _Phase("unfrozen", epochs, unfrozen_learning_rate, unfrozen, True),
    )
    return tuple(phase for phase in phases if phase.end_epoch > 0)


def trains_batchnorm(batchnorm: str, weights) -> bool:
    """Whether BatchNorm layers train once unfrozen: "train", or "auto" from random init."""
    return batchnorm == "train" or (batchnorm == "auto" and weights is None)


def _positive(value: int, name: str) -> int:
    if value < 1:
        raise InputError(f"training: {name} must be at least 1, got {value}")
    return value


# --- the shared loop --------------------------------------------------------------------------------------------


def _run(
    task: _Task,
    train: pd.DataFrame,
    val: pd.DataFrame,
    targets: tuple[np.ndarray, np.ndarray],
    out_dir: str | Path,
    weights: str | Path | None,
    settings: dict[str, Any],
    extra: dict[str, Any],
    resume: bool,
    verbose: int,
) -> TrainResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = settings["options"]
    state = _load_state(out_dir, task) if resume else None
    state = state or {
        "epoch": 0,
        "phase": None,
        "best": None,
        "best_epoch": 0,
        "wait": 0,
        "stopped": False,
        "wall_seconds": 0.0,
        "history": [],
    }
    if state["epoch"] == 0:
        (out_dir / BEST_WEIGHTS).unlink(missing_ok=True)  # never export a previous run's weights
    seed = settings["seed"] + state["epoch"]  # a resumed run draws fresh (but repeatable) shuffles
    keras.utils.set_random_seed(seed)
    with _precision_policy(_gpu_available()):
        model = _initial_model(task, out_dir, state, weights, options)
        _write_seen_images(out_dir / SEEN_IMAGES, pd.concat([train, val])["path"])
        train_data = _dataset(train["path"], targets[0], settings, training=True, seed=seed)
        val_data = _dataset(val["path"], targets[1], settings, training=False, seed=seed)
        class_weight = _balanced_class_weight(targets[0].ravel())
        loaded_phase = state["phase"]
        for phase in task.phases:
            if state["stopped"] or state["epoch"] >= phase.end_epoch:
                continue
            if phase.name != loaded_phase:
                _set_trainable(model, phase.trainable)
                _compile(model, task, phase.learning_rate)
            loaded_phase = phase.name
            recorder = _EpochRecorder(out_dir, state, phase, task, settings["patience"])
            model.fit(
                train_data,
                validation_data=val_data,
                initial_epoch=state["epoch"],
                epochs=phase.end_epoch,
                class_weight=class_weight,
                callbacks=[recorder],
                shuffle=False,  # the dataset shuffles itself, seeded per epoch
                verbose=verbose,
            )
    model_path = _export_best(task, out_dir, options)
    result = TrainResult(model_path, state["history"], state["best_epoch"], _val_metrics(state))
    _write_reports(out_dir, task, result, state, settings, extra, train, val)
    return result


def _initial_model(task: _Task, out_dir: Path, state: dict, weights, options: dict) -> keras.Model:
    """The checkpoint (compiled, optimizer state included) when resuming, else a freshly built backbone."""
    if state["epoch"] > 0:
        return keras.saving.load_model(out_dir / CHECKPOINT, compile=True, safe_mode=True)
    model = backbones.build_backbone(task.backbone, task.image_size, weights, task.num_outputs, **options)
    if any(phase.trainable == "all" for phase in task.phases):
        # keras.applications use BatchNorm momentum 0.99-0.999, tuned for ImageNet-length runs: after a few
        # hundred steps the moving statistics still sit near their initial (or pretrained) values and
        # validation (inference mode) outputs are garbage. Short runs need them to follow the weights faster.
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = TRAINED_BATCHNORM_MOMENTUM
    return model


def _load_state(out_dir: Path, task: _Task) -> dict | None:
    """The saved state of an interrupted run in `out_dir`, or None when there is nothing to resume."""
    path = out_dir / STATE
    if not path.is_file() or not (out_dir / CHECKPOINT).is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("task") != [task.kind, task.backbone, task.num_outputs]:
        raise InputError(f"{path}: the checkpoint there is from another task {state.get('task')}; use a new out_dir")
    return state


class _EpochRecorder(keras.callbacks.Callback):
    """After every epoch: history, best weights, checkpoint and state on disk; early stopping on the monitor."""

    def __init__(self, out_dir: Path, state: dict, phase: _Phase, task: _Task, patience: int):
        super().__init__()
        self.out_dir, self.state, self.phase, self.task, self.patience = out_dir, state, phase, task, patience
        self.started = time.perf_counter()
        self.wall_before = state["wall_seconds"]
        if phase.name != state["phase"]:
            state["wait"] = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = {key: float(value) for key, value in (logs or {}).items()}
        state = self.state
        state["history"].append({"epoch": epoch + 1, "phase": self.phase.name, **logs})
        task = [self.task.kind, self.task.backbone, self.task.num_outputs]
        state.update(epoch=epoch + 1, phase=self.phase.name, task=task)
        value = logs.get(self.task.monitor, float("nan"))
        if _improved(value, state["best"], self.task.mode):
            state.update(best=value, best_epoch=epoch + 1, wait=0)
            write_atomic(self.out_dir / BEST_WEIGHTS, self.model.save_weights)
        elif self.phase.early_stopping:
            state["wait"] += 1
            if state["wait"] >= self.patience:
                state["stopped"] = True
                self.model.stop_training = True
        state["wall_seconds"] = self.wall_before + time.perf_counter() - self.started
        write_atomic(self.out_dir / CHECKPOINT, self.model.save)
        write_atomic(self.out_dir / STATE, lambda temp: Path(temp).write_text(json.dumps(state, indent=1)))


def _improved(value: float, best: float | None, mode: str) -> bool:
    if not np.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def _set_trainable(model: keras.Model, trainable: str) -> None:
    for layer in model.layers:
        if trainable == "head":
            layer.trainable = layer.name == backbones.HEAD_LAYER
        elif trainable == "all_but_batchnorm":
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
        else:
            layer.trainable = True


def _compile(model: keras.Model, task: _Task, learning_rate: float) -> None:
    if task.kind == "pretrain":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    else:
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        metrics = [keras.metrics.AUC(from_logits=True, name="auc"), keras.metrics.BinaryAccuracy(threshold=0.0)]
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics)


def _balanced_class_weight(y: np.ndarray) -> dict[int, float]:
    """sklearn's "balanced" weights: n_samples / (n_classes * count), so every class carries the same total."""
    classes, counts = np.unique(y.astype(int), return_counts=True)
    return {int(c): float(len(y) / (len(classes) * n)) for c, n in zip(classes, counts, strict=True)}


def _gpu_available() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


@contextlib.contextmanager
def _precision_policy(mixed: bool) -> Iterator[None]:
    """Mixed float16 compute inside the block when `mixed` (GPU); the global policy is restored afterwards."""
    previous = keras.config.dtype_policy()
    if mixed:
        keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# --- data -------------------------------------------------------------------------------------------------------


def radiograph_augmentation(seed: int = 0) -> keras.Sequential:
    """Mild geometric and photometric jitter suited to radiographs, on [0, 255] grayscale batches."""
    layers = keras.layers
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomRotation(0.03, fill_mode="constant", seed=seed + 1),  # about +-10 degrees
            layers.RandomZoom((-0.15, 0.05), fill_mode="constant", seed=seed + 2),  # mostly zoom in: random crops
            layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed + 3),
            layers.RandomContrast(0.15, value_range=(0, 255), seed=seed + 4),
        ],
        name="radiograph_augmentation",
    )


def _dataset(paths: pd.Series, targets: np.ndarray, settings: dict, training: bool, seed: int):
    """Decoded images cached in memory; for training shuffled every epoch and augmented per batch."""
    import tensorflow as tf

    size, batch_size = settings["image_size"], settings["batch_size"]
    data = image_dataset(list(paths), size, settings["clahe"], batch_size, targets).unbatch()
    data = data.apply(tf.data.experimental.assert_cardinality(len(paths))).cache()  # known length: progress bars
    if training:
        data = data.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size)
    if training and settings["augment"]:
        augmenter = radiograph_augmentation(seed)
        data = data.map(lambda x, y: (tf.clip_by_value(augmenter(x, training=True), 0.0, 255.0), y))
    return data.prefetch(tf.data.AUTOTUNE)


def _write_seen_images(path: Path, paths: pd.Series) -> None:
    """`sha256  path` per training/validation image (paths relative to their common folder)."""
    paths = [str(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    lines = [f"{file_sha256(p)}  {os.path.relpath(p, root)}\n" for p in paths]
    write_atomic(path, lambda temp: Path(temp).write_text("".join(lines)))


def read_seen_images(path: str | Path) -> set[str]:
    """The sha256 of every image listed in a `seen_images.txt` written by `_write_seen_images`."""
    return {line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()}


# --- outputs ----------------------------------------------------------------------------------------------------


def _export_best(task: _Task, out_dir: Path, options: dict) -> Path:
    """Rebuild the architecture in float32 (no optimizer), load the best weights, save it as `model.keras`."""
    if not (out_dir / BEST_WEIGHTS).is_file():
        raise InputError(f"{out_dir}: no epoch produced a finite {task.monitor}; nothing to export")
    model = backbones.build_backbone(task.backbone, task.image_size, None, task.num_outputs, **options)
    model.load_weights(out_dir / BEST_WEIGHTS)
    write_atomic(out_dir / MODEL, model.save)
    return out_dir / MODEL


def _val_metrics(state: dict) -> dict[str, float]:
    best = next((row for row in state["history"] if row["epoch"] == state["best_epoch"]), {})
    return {key: value for key, value in best.items() if key.startswith("val_")}


def _write_reports(
    out_dir: Path,
    task: _Task,
    result: TrainResult,
    state: dict,
    settings: dict,
    extra: dict,
    train: pd.DataFrame,
    val: pd.DataFrame,
) -> None:
    history = pd.DataFrame(result.history)
    history.to_csv(out_dir / "history.csv", index=False)
    plot_curves(history, out_dir / "curves.png", task.metric)
    summary = {
        "task": task.kind,
        "backbone": task.backbone,
        "settings": settings,
        **extra,
        "data": {
            name: part["label"].astype(str).value_counts().sort_index().to_dict()
            for name, part in (("train", train), ("val", val))
        },
        "epochs_run": state["epoch"],
        "stopped_early": state["stopped"],
        "best_epoch": result.best_epoch,
        "monitor": task.monitor,
        "val_metrics": result.val_metrics,
        "wall_seconds": round(state["wall_seconds"], 1),
        "seen_images": {"file": SEEN_IMAGES, "count": len(train) + len(val)},
        "environment": environment(),
    }
    write_atomic(out_dir / "train.json", lambda temp: Path(temp).write_text(json.dumps(summary, indent=2)))


def plot_curves(history: pd.DataFrame, path: Path, metric: str) -> None:
    """Loss and `metric` per epoch, training and validation, with the phase changes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, name in zip(axes, ("loss", metric), strict=True):
        for column, style in ((name, "-o"), (f"val_{name}", "-s")):
            if column in history:
                axis.plot(history["epoch"], history[column], style, label=column)
        for epoch in history["epoch"][history["phase"].ne(history["phase"].shift()) & (history.index > 0)]:
            axis.axvline(epoch - 0.5, color="grey", linestyle=":")
        axis.set_xlabel("epoch")
        axis.set_title(name)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def environment() -> dict[str, Any]:
    """Versions and machine facts worth recording next to any timing or metric."""
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpus": [device.name for device in tf.config.list_physical_devices("GPU")],
    }


# --- the shipped in-domain backbones ----------------------------------------------------------------------------

CONFIG_KEYS = {
    "description",
    "weights",
    "warmup_epochs",
    "unfrozen_learning_rate",
    "batchnorm",
    "hold_out_policy",
    "data_root",
    "sources",
    "split",
    "drop_splits",
    "image_size",
    "epochs",
    "batch_size",
    "learning_rate",
    "patience",
    "seed",
    "augment",
    "clahe",
    "limits",
}
SOURCE_KEYS = {
    "name",
    "csv",
    "path_column",
    "label_column",
    "patient_column",
    "region_column",
    "regions",
    "class_names",
}
SPLIT_KEYS = {"test_fraction", "val_fraction", "seed"}


def load_pretraining_config(path: str | Path) -> dict[str, Any]:
    """Read a pretraining YAML (e.g. `experiments/pretrain_xray.yaml`); unknown keys are errors."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    config = yaml.safe_load(path.read_text()) or {}
    _check_keys(config, CONFIG_KEYS, str(path))
    for number, source in enumerate(config.get("sources") or []):
        _check_keys(source, SOURCE_KEYS, f"{path}: sources[{number}]")
    _check_keys(config.get("split") or {}, SPLIT_KEYS, f"{path}: split")
    if not config.get("sources"):
        raise InputError(f"{path}: 'sources' is missing or empty")
    config["data_root"] = str((path.parent / config.get("data_root", ".")).resolve())
    if config.get("weights") not in (None, "imagenet"):
        config["weights"] = str((path.parent / config["weights"]).resolve())
    return config


def _check_keys(mapping: Mapping, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def pretraining_table(
    sources: Sequence[Mapping[str, Any]],
    data_root: str | Path,
    split: Mapping[str, Any] | None = None,
    drop_splits: Sequence[str] = ("test",),
) -> pd.DataFrame:
    """One table over several CSV sources with combined labels "<source>/<region>/<class>" ("<source>/<class>").

    Each source (each of its `regions` separately, when listed) is split by `data.splits.assign_splits(**split)`
    exactly as an experiment on that source alone would split it; rows in `drop_splits` are then removed, so
    the held-out test images of those experiments are never seen in pretraining.
    """
    from tlfusion.data.sources import read_csv
    from tlfusion.data.splits import assign_splits

    parts = []
    for source in sources:
        reader_args = {
            key: source[key]
            for key in ("path_column", "label_column", "patient_column", "region_column")
            if key in source
        }
        csv = Path(data_root) / source["csv"]
        regions = source.get("regions") or [None]
        for region in regions:
            filters = {source["region_column"]: region} if region is not None else None
            part = assign_splits(read_csv(csv, filters=filters, **reader_args), **(split or {}))
            part = part[~part["split"].isin(list(drop_splits))].copy()
            names = source.get("class_names") or {}
            classes = part["label"].astype(str).map(lambda label: str(names.get(label, label)))  # noqa: B023
            prefix = part["region"].map(lambda r: f"{source['name']}/{r}/" if r else f"{source['name']}/")  # noqa: B023
            part["label"] = prefix + classes
            part["source"] = source["name"]
            parts.append(part)
    return pd.concat(parts, ignore_index=True)


def pretrain_from_config(
    config_path: str | Path,
    backbone: str,
    run_dir: str | Path,
    data_root: str | Path | None = None,
    resume: bool = False,
    verbose: int = 1,
) -> TrainResult:
    """Build the combined table a pretraining YAML describes and run `pretrain` on it into `run_dir`."""
    config = load_pretraining_config(config_path)
    table = pretraining_table(
        config["sources"], data_root or config["data_root"], config.get("split"), config.get("drop_splits", ["test"])
    )
    keys = (
        "weights",
        "image_size",
        "warmup_epochs",
        "epochs",
        "batch_size",
        "learning_rate",
        "unfrozen_learning_rate",
        "patience",
        "seed",
        "augment",
        "clahe",
        "batchnorm",
    )
    settings = {key: config[key] for key in keys if key in config}
    result = pretrain(table, backbone, run_dir, resume=resume, verbose=verbose, **settings)
    counts = table.groupby(["source", "split"]).size().unstack(fill_value=0)
    _update_json(Path(run_dir) / "train.json", {"sources": counts.to_dict(orient="index"), "config": config})
    return result


def _update_json(path: Path, fields: Mapping[str, Any]) -> None:
    content = {**json.loads(path.read_text()), **fields}
    write_atomic(path, lambda temp: Path(temp).write_text(json.dumps(content, indent=2)))


def ship_pretrained(run_dir: str | Path, ship_dir: str | Path, command: str) -> Path:
    """Copy a pretraining run's shippable files to `ship_dir`, write its MODEL_CARD.md and update the manifest.

    The manifest (`ship_dir/../manifest.json`) lists every shipped file with its size and sha256.
    """
    run_dir, ship_dir = Path(run_dir), Path(ship_dir)
    ship_dir.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, ship_dir / name)
    summary = json.loads((run_dir / "train.json").read_text())
    (ship_dir / "MODEL_CARD.md").write_text(model_card(summary, ship_dir.name, command))
    manifest_path = ship_dir.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"files": {}}
    for name in SHIPPED_FILES:
        path = ship_dir / name
        if path.is_file():
            manifest["files"][f"{ship_dir.name}/{name}"] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    write_atomic(manifest_path, lambda temp: Path(temp).write_text(json.dumps(manifest, indent=2) + "\n"))
    return ship_dir


def model_card(summary: Mapping[str, Any], name: str, command: str) -> str:
    """MODEL_CARD.md text from a pretraining run's `train.json`."""
    settings, config, env = summary["settings"], summary.get("config", {}), summary["environment"]
    sources = summary.get("sources", {})
    source_rows = "\n".join(f"| {src} | {c.get('train', 0)} | {c.get('val', 0)} |" for src, c in sources.items())
    class_rows = "\n".join(
        f"| {label} | {summary['data']['train'].get(label, 0)} | {summary['data']['val'].get(label, 0)} |"
        for label in summary["classes"]
    )
    metrics = ", ".join(f"{key} {value:.4f}" for key, value in summary["val_metrics"].items())
    return f"""# {name}: {summary["backbone"]} pretrained in-domain on radiographs

{config.get("description", "").strip()}

Input: one grayscale channel in [0, 255], {settings["image_size"]}x{settings["image_size"]} (aspect kept, black
padding: `tlfusion.data.images.load_image`). Layers `features` (pooled penultimate features) and `head`
({len(summary["classes"])} logits, classes below). Load with `tlfusion.backbones.load_model_file` or pass the
file as `weights=` to `build_backbone` / `training.finetune` (the head is replaced).

## Data ({summary["seen_images"]["count"]} images; sha256 of each in `{SEEN_IMAGES}`)

| source | train | val |
|---|---|---|
{source_rows}

| class | train | val |
|---|---|---|
{class_rows}

## Held-out policy

{config.get("hold_out_policy", "").strip()}

## Training

Start: {_start_description(settings.get("weights"))}. Softmax over the classes above with balanced class weights,
Adam, batch {settings["batch_size"]}; {_schedule_description(settings)};
augmentation {"on" if settings["augment"] else "off"} (flip, +-10 deg rotation,
zoom/crop, brightness, contrast), CLAHE {"on" if settings["clahe"] else "off"}, seed {settings["seed"]}; up to
{settings["epochs"]} epochs with early stopping on val loss (patience {settings["patience"]}).
Ran {summary["epochs_run"]} epochs{" (stopped early)" if summary["stopped_early"] else ""}; best epoch
{summary["best_epoch"]} (kept as `model.keras`).

Validation (grouped val split, best epoch): {metrics}.

Wall time {summary["wall_seconds"] / 60:.1f} min on {env["platform"]}, {env["cpu_count"]} CPU cores
(shared), GPUs: {env["gpus"] or "none"}; TensorFlow {env["tensorflow"]}, Keras {env["keras"]}.
Curves: `curves.png`; per-epoch numbers: `history.csv`; everything else: `train.json`.

## Reproduce

```
{command}
```

## Limits

Small pretraining set (a few thousand images at most, two public sources); validation accuracy is over a
combined label space with rare classes, so read it as a sanity check, not as a diagnostic figure.
{config.get("limits", "").strip()}
"""


def _start_description(weights: str | None) -> str:
    if weights is None:
        return "random init"
    if weights == "imagenet":
        return "ImageNet (tlfusion/resources/imagenet, Apache-2.0: photographs, no radiographs)"
    return f"`{Path(weights).name}` from {Path(weights).parent.name}"


def _schedule_description(settings: Mapping[str, Any]) -> str:
    """The learning-rate phases and BatchNorm handling of a training run, in words."""
    warmup = settings.get("warmup_epochs", 0)
    unfrozen_rate = settings.get("unfrozen_learning_rate") or settings["learning_rate"]
    head = f"head alone for {warmup} epoch(s) at lr {settings['learning_rate']}, then " if warmup else ""
    trained = trains_batchnorm(settings.get("batchnorm", "auto"), settings.get("weights"))
    batchnorm = f"BatchNorm trained (momentum {TRAINED_BATCHNORM_MOMENTUM})" if trained else "BatchNorm frozen"
    return f"{head}every layer at lr {unfrozen_rate} ({batchnorm})"


def pretrain_and_ship(
    config: str, arch: str, out: str, run_dir: str | None = None, data_root: str | None = None, resume: bool = False
) -> Path:
    """Pretrain `arch` as `config` describes (checkpoints in `run_dir`), then ship model + card into `out`."""
    run_dir = Path(run_dir or Path("runs") / f"pretrain_{Path(out).name}")
    command = " ".join(["tlfusion pretrain", config, "--arch", arch, "--out", out])
    pretrain_from_config(config, arch, run_dir, data_root, resume)
    return ship_pretrained(run_dir, out, command)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tlfusion.training CONFIG.yaml --arch NAME --out DIR` (the same as `tlfusion pretrain`)."""
    from tlfusion.cli import main as cli_main

    return cli_main(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
