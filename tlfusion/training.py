"""Fine-tuning of tlfusion backbones, and the training loop it shares with `pretraining`: per-epoch checkpoints,
early stopping and resume.

`finetune` and `pretraining.pretrain` take a table with the `data.sources` columns whose `split` is "train" /
"val" (other rows are ignored) and write into `out_dir`:

- `model.keras`: the best epoch (lowest val loss for pretraining, highest val AUC for fine-tuning), a plain
  float32 tlfusion backbone that `backbones.load_model_file` accepts;
- `checkpoint.keras` + `state.json`: the last finished epoch with its optimizer, for `resume=True`;
- `history.csv`, `curves.png`, `train.json` (settings, data counts, best epoch, val metrics, wall time) and
  `seen_images.txt` (sha256 of every training and validation image, for leakage checks downstream).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from tlfusion import backbones
from tlfusion.config import FinetuneSpec, ImageSpec
from tlfusion.data.images import training_dataset
from tlfusion.errors import InputError
from tlfusion.fileio import write_atomic, write_json
from tlfusion.provenance import SEEN_IMAGES, write_seen_images
from tlfusion.runfiles import check_keras_file, read_json_object
from tlfusion.strategy import distribution
from tlfusion.training_records import write_records

CHECKPOINT = "checkpoint.keras"
STATE = "state.json"
BEST_WEIGHTS = "best.weights.h5"
MODEL = "model.keras"
TRAINED_BATCHNORM_MOMENTUM = 0.9
SETTINGS = (
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
    "distribute",
)
"""The arguments of `finetune` and `pretraining.pretrain` that `train.json` records (with `weights`, `options`)."""
log = logging.getLogger("tlfusion")
_FINETUNE = FinetuneSpec()  # the defaults of `finetune`: those of an experiment's `finetune` and `image` sections
_IMAGE = ImageSpec()


@dataclass
class TrainResult:
    """What a training run produced: the best model file, per-epoch history, best epoch (1-based), its val metrics."""

    model_path: Path
    history: list[dict[str, Any]]
    best_epoch: int
    val_metrics: dict[str, float]


@dataclass(frozen=True)
class Phase:
    name: str
    end_epoch: int  # epochs finished (counted from the run's start) when this phase ends
    learning_rate: float
    trainable: str  # "all", "head" (backbone frozen) or "all_but_batchnorm" (BatchNorm kept in inference mode)
    early_stopping: bool


@dataclass(frozen=True)
class Task:
    kind: str  # "pretrain" / "multiclass" (softmax over classes), "finetune" (one logit), "ordinal" (K-1 cumulative
    # logits), or a pretraining objective's name
    backbone: str
    image_size: int
    num_outputs: int
    phases: tuple[Phase, ...]
    monitor: str
    mode: str  # "min" or "max"
    metric: str  # the metric plotted beside the loss
    loss: Any = None  # a Keras loss replacing the kind's own (its `metrics` beside it), e.g. `pretraining_losses`
    metrics: tuple = ()
    views: int = 1  # 2: each training image as two augmented views in a row (`data.images.training_dataset`)


def finetune(
    table: pd.DataFrame,
    backbone: str,
    out_dir: str | Path,
    *,
    positive_class: str | None = None,
    classes: Sequence[str] | None = None,
    head: str = _FINETUNE.head,
    weights: str | Path | None = None,
    image_size: int = _IMAGE.size,
    warmup_epochs: int = _FINETUNE.warmup_epochs,
    epochs: int = _FINETUNE.epochs,
    batch_size: int = _FINETUNE.batch_size,
    learning_rate: float = _FINETUNE.learning_rate,
    unfrozen_learning_rate: float = _FINETUNE.unfrozen_learning_rate,
    patience: int = _FINETUNE.patience,
    seed: int = 0,
    resume: bool = False,
    augment: bool = True,
    clahe: bool = _IMAGE.clahe,
    batchnorm: str = _FINETUNE.batchnorm,
    distribute: str = _FINETUNE.distribute,
    options: Mapping[str, Any] | None = None,
    verbose: int = 1,
) -> TrainResult:
    """Binary fine-tuning (`positive_class` vs the rest) of a backbone initialised from `weights`.

    `weights`: None (random init), "imagenet", or a tlfusion `.keras` / `.weights.h5` file (e.g. a pretrained
    `model.keras`; its head is replaced). `epochs` counts every epoch: the first `warmup_epochs` train only the
    head at `learning_rate`, the rest train everything at `unfrozen_learning_rate`. `batchnorm`: "freeze" keeps
    BatchNorm layers in inference mode once unfrozen, "train" trains them (moving statistics re-estimated quickly),
    "auto" freezes them from pretrained weights and trains them from random init. `distribute` picks the
    `tf.distribute` strategy (`tlfusion.strategy`: `batch_size` per replica, learning rates x replicas). The epoch
    with the best val AUC becomes `model.keras`; early stopping applies after the warm-up. The defaults are
    `config.FinetuneSpec`'s.

    With `classes` (K >= 3, in order) instead of `positive_class`, the fine-tuning is K-class (`head` "softmax":
    K logits, class-weighted cross-entropy; "ordinal": K-1 cumulative logits P(class > k), cross-entropy on each)
    and the epoch with the lowest val loss becomes `model.keras`.
    """
    arguments = dict(locals())  # before any other local: what train.json records
    train, val = train_val_rows(table)
    schedule = phases(weights, warmup_epochs, epochs, learning_rate, unfrozen_learning_rate, batchnorm)
    if classes is not None:
        task, targets, extra = _class_task(
            train, val, list(classes), head, architecture(backbone), image_size, schedule
        )
        settings = training_settings(arguments, classes=list(classes), head=head)
        return run_task(task, train, val, targets, out_dir, settings, extra, resume, verbose)
    if positive_class is None:
        raise ValueError("finetune: give positive_class (binary) or classes (multi-class)")
    labels = set(train["label"].astype(str))
    if str(positive_class) not in labels:
        raise InputError(f"finetune: positive_class {positive_class!r} is not a training label ({sorted(labels)})")
    require_classes(sorted(labels), val, "finetune")
    if val["label"].astype(str).eq(str(positive_class)).nunique() < 2:
        raise InputError(f"finetune: the 'val' rows need both {positive_class!r} and other labels for a val AUC")
    task = Task(
        kind="finetune",
        backbone=architecture(backbone),
        image_size=image_size,
        num_outputs=1,
        phases=schedule,
        monitor="val_auc",
        mode="max",
        metric="auc",
    )
    targets = tuple(
        (part["label"].astype(str) == str(positive_class)).to_numpy(np.float32)[:, None] for part in (train, val)
    )
    settings = training_settings(arguments, positive_class=str(positive_class))
    extra = {"classes": [f"not {positive_class}", str(positive_class)]}
    return run_task(task, train, val, targets, out_dir, settings, extra, resume, verbose)


def _class_task(
    train: pd.DataFrame, val: pd.DataFrame, classes: list[str], head: str, backbone: str, size: int, schedule: tuple
) -> tuple[Task, tuple[np.ndarray, np.ndarray], dict[str, Any]]:
    """The K-class fine-tuning task, its (train, val) targets and what train.json adds: "softmax" class codes, or
    "ordinal" cumulative targets [n, K-1] (column k: class > k) under plain binary cross-entropy on each logit."""
    if head not in ("softmax", "ordinal"):
        raise ValueError(f"finetune: head must be 'softmax' or 'ordinal', got {head!r}")
    for name, part in (("training", train), ("validation", val)):
        unknown = sorted(set(part["label"].astype(str)) - set(classes))
        if unknown:
            raise InputError(f"finetune: {name} label(s) {unknown} are not among the classes {classes}")
    require_classes(sorted(set(train["label"].astype(str))), val, "finetune")
    index = {name: code for code, name in enumerate(classes)}
    codes = tuple(part["label"].astype(str).map(index).to_numpy(np.int32) for part in (train, val))
    common = {"backbone": backbone, "image_size": size, "phases": schedule, "monitor": "val_loss", "mode": "min"}
    if head == "softmax":
        task = Task(kind="multiclass", num_outputs=len(classes), metric="accuracy", **common)
        return task, codes, {"classes": classes, "head": head}
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    task = Task(kind="ordinal", num_outputs=len(classes) - 1, metric="loss", loss=loss, **common)
    cumulative = tuple((code[:, None] > np.arange(len(classes) - 1)).astype(np.float32) for code in codes)
    # output k is the logit of P(class > classes[k]), i.e. of "classes[k + 1] or above"
    return task, cumulative, {"classes": classes, "head": head, "outputs": classes[1:]}


def training_settings(arguments: Mapping[str, Any], **changed: Any) -> dict[str, Any]:
    """What `train.json` records of a run's settings: of a training function's `arguments`, `weights` as text, the
    `SETTINGS` it has, `changed` values, then the backbone `options`."""
    weights, options = arguments["weights"], arguments["options"]
    recorded = {name: arguments[name] for name in SETTINGS if name in arguments}
    return {"weights": None if weights is None else str(weights), **recorded, **changed, "options": dict(options or {})}


# --- table checks -----------------------------------------------------------------------------------------------


def train_val_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The table's "train" and "val" rows: ValueError without the columns (a caller's mistake), InputError when
    either part is empty (the data or its split settings)."""
    missing = [column for column in ("path", "label", "split") if column not in table.columns]
    if missing:
        raise ValueError(f"training table: missing column(s) {missing}")  # the caller built a wrong table
    train = table[table["split"] == "train"].reset_index(drop=True)
    val = table[table["split"] == "val"].reset_index(drop=True)
    if train.empty:
        raise InputError("training table: no rows with split 'train'")
    if val.empty:
        raise InputError("training table: no rows with split 'val' (see data.splits.assign_splits)")
    return train, val


def require_classes(classes: Sequence[str], val: pd.DataFrame, what: str) -> None:
    """At least two training classes, and no validation label outside them."""
    if len(classes) < 2:
        raise InputError(f"{what}: the training rows have only one class ({list(classes)}); need at least two")
    unseen = sorted(set(val["label"].astype(str)) - set(classes))
    if unseen:
        raise InputError(f"{what}: validation label(s) {unseen} never occur in the training rows")


def architecture(name: str) -> str:
    """The registry name of `name` (InputError listing the known ones when unknown)."""
    backbones.get_spec(name)
    return name.lower()


def phases(
    weights, warmup_epochs: int, epochs: int, learning_rate: float, unfrozen_learning_rate: float, batchnorm: str
) -> tuple[Phase, ...]:
    """Head-only warm-up at `learning_rate`, then everything at `unfrozen_learning_rate` (early stopping there)."""
    if not 0 <= warmup_epochs <= _positive(epochs, "epochs"):
        raise InputError(f"training: warmup_epochs must be between 0 and epochs ({epochs}), got {warmup_epochs}")
    if batchnorm not in ("auto", "train", "freeze"):
        raise ValueError(f"training: batchnorm must be 'auto', 'train' or 'freeze', got {batchnorm!r}")
    unfrozen = "all" if trains_batchnorm(batchnorm, weights) else "all_but_batchnorm"
    both = (
        Phase("warmup", warmup_epochs, learning_rate, "head", False),
        Phase("unfrozen", epochs, unfrozen_learning_rate, unfrozen, True),
    )
    return tuple(phase for phase in both if phase.end_epoch > 0)


def trains_batchnorm(batchnorm: str, weights) -> bool:
    """Whether BatchNorm layers train once unfrozen: "train", or "auto" from random init."""
    return batchnorm == "train" or (batchnorm == "auto" and weights is None)


def _positive(value: int, name: str) -> int:
    if value < 1:
        raise InputError(f"training: {name} must be at least 1, got {value}")
    return value


# --- the shared loop --------------------------------------------------------------------------------------------


def run_task(
    task: Task,
    train: pd.DataFrame,
    val: pd.DataFrame,
    targets: tuple[np.ndarray, np.ndarray],
    out_dir: str | Path,
    settings: dict[str, Any],
    extra: dict[str, Any],
    resume: bool,
    verbose: int,
) -> TrainResult:
    """Train `task` on the rows (`targets`: train, val) into `out_dir`, as `training_settings` describe; the
    outputs listed in this module's docstring, `extra` added to `train.json`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = (_load_state(out_dir, task) if resume else None) or {
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
    chosen = distribution(settings.get("distribute", "auto"))
    extra = {**extra, "distribution": chosen.describe()}
    with chosen.scope(), _precision_policy(_gpu_available()):  # models built and compiled under the strategy
        model = _initial_model(task, out_dir, state, settings["weights"], settings["options"])
        write_seen_images(out_dir / SEEN_IMAGES, pd.concat([train, val])["path"])
        size, clahe, batch = task.image_size, settings["clahe"], chosen.global_batch(settings["batch_size"])
        augment, views = settings["augment"], task.views
        train_data = training_dataset(train["path"], targets[0], size, clahe, batch, seed, augment, views)
        val_seed = settings["seed"] if views > 1 else None  # two views must differ in validation too
        val_data = training_dataset(val["path"], targets[1], size, clahe, batch, val_seed, augment, views)
        class_weight = None if task.loss is not None else _balanced_class_weight(targets[0].ravel())
        data = (train_data, val_data, class_weight)
        _fit_phases(model, task, state, data, out_dir, settings["patience"], verbose, chosen.learning_rate)
    model_path = _export_best(task, out_dir, settings["options"])
    result = TrainResult(model_path, state["history"], state["best_epoch"], _val_metrics(state))
    write_records(out_dir, task, result, state, settings, extra, train, val)
    return result


def _fit_phases(
    model: keras.Model,
    task: Task,
    state: dict,
    data: tuple,
    out_dir: Path,
    patience: int,
    verbose: int,
    scaled: Callable[[float], float],
) -> None:
    """Fit each phase not yet finished (`data`: train and val datasets, class weights), recording every epoch;
    `scaled` maps a phase's learning rate to the one used (the strategy's scaling rule)."""
    train_data, val_data, class_weight = data
    loaded_phase = state["phase"]
    for phase in task.phases:
        if state["stopped"] or state["epoch"] >= phase.end_epoch:
            continue
        if phase.name != loaded_phase:
            _set_trainable(model, phase.trainable)
            _compile(model, task, scaled(phase.learning_rate))
        loaded_phase = phase.name
        model.fit(
            train_data,
            validation_data=val_data,
            initial_epoch=state["epoch"],
            epochs=phase.end_epoch,
            class_weight=class_weight,
            callbacks=[_EpochRecorder(out_dir, state, phase, task, patience)],
            shuffle=False,  # the dataset shuffles itself, seeded per epoch
            verbose=verbose,
        )


def _initial_model(task: Task, out_dir: Path, state: dict, weights, options: dict) -> keras.Model:
    """The checkpoint (compiled, optimizer state included) when resuming, else a freshly built backbone."""
    if state["epoch"] > 0:
        check_keras_file(out_dir / CHECKPOINT)  # a damaged checkpoint exits 2 naming it, not with Keras's traceback
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


def _load_state(out_dir: Path, task: Task) -> dict | None:
    """The saved state of an interrupted run in `out_dir`, or None when there is nothing to resume."""
    path = out_dir / STATE
    if not path.is_file() or not (out_dir / CHECKPOINT).is_file():
        return None
    state = read_json_object(path)
    if state.get("task") != [task.kind, task.backbone, task.num_outputs]:
        raise InputError(f"{path}: the checkpoint there is from another task {state.get('task')}; use a new out_dir")
    return state


class _EpochRecorder(keras.callbacks.Callback):
    """After every epoch: history, best weights, checkpoint and state on disk; early stopping on the monitor."""

    def __init__(self, out_dir: Path, state: dict, phase: Phase, task: Task, patience: int):
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
        write_json(self.out_dir / STATE, state)
        log.info("%s: %s", self.task.kind, run_eta(state, self.task.phases[-1].end_epoch))


def run_eta(state: dict, total_epochs: int) -> str:
    """Progress line such as "epoch 3/12, best 2, 4.1 min so far, about 12.3 min left" (mean epoch time x the rest)."""
    done, wall = state["epoch"], state["wall_seconds"]
    left = 0 if state["stopped"] else total_epochs - done
    return (
        f"epoch {done}/{total_epochs}, best {state['best_epoch']}, {wall / 60:.1f} min so far, "
        f"about {wall / max(done, 1) * left / 60:.1f} min left{' (stopped early)' if state['stopped'] else ''}"
    )


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


def _compile(model: keras.Model, task: Task, learning_rate: float) -> None:
    if task.loss is not None:
        loss, metrics = task.loss, list(task.metrics)
    elif task.kind in ("pretrain", "multiclass"):
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


# --- outputs ----------------------------------------------------------------------------------------------------


def _export_best(task: Task, out_dir: Path, options: dict) -> Path:
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
