"""The training loop fine-tuning and pretraining share: phases, per-epoch checkpoints, early stopping, resume."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from tlfusion.backbones import registry as backbones
from tlfusion.data.images import training_dataset
from tlfusion.errors import InputError
from tlfusion.fileio import write_atomic, write_json
from tlfusion.run.readers import check_keras_file, read_json_object
from tlfusion.training.distribution import distribution
from tlfusion.training.provenance import SEEN_IMAGES, write_seen_images
from tlfusion.training.records import write_records
from tlfusion.training.task import Phase, TrainingTask, TrainResult, TrainSettings

log = logging.getLogger("tlfusion")

CHECKPOINT = "checkpoint.keras"


STATE = "state.json"


BEST_WEIGHTS = "best.weights.h5"


MODEL = "model.keras"


TRAINED_BATCHNORM_MOMENTUM = 0.9


def run_task(
    task: TrainingTask,
    rows: tuple[pd.DataFrame, pd.DataFrame],
    targets: tuple[np.ndarray, np.ndarray],
    out_dir: str | Path,
    settings: TrainSettings,
    recorded: dict[str, Any],
    extra: dict[str, Any],
    resume: bool = False,
    verbose: int = 1,
) -> TrainResult:
    """Train `task` on the (train, val) `rows` and their `targets` into `out_dir` as `settings` say; writes what
    `training.finetune`'s docstring lists, `recorded` as train.json's settings and `extra` added to it."""
    train, val = rows
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
    seed = settings.seed + state["epoch"]  # a resumed run draws fresh (but repeatable) shuffles
    keras.utils.set_random_seed(seed)
    chosen = distribution(settings.distribute)
    extra = {**extra, "distribution": chosen.describe()}
    with chosen.scope(), _precision_policy(_gpu_available()):  # models built and compiled under the strategy
        model = _initial_model(task, out_dir, state, settings.weights, settings.options)
        write_seen_images(out_dir / SEEN_IMAGES, pd.concat([train, val])["path"])
        size, clahe, batch = task.image_size, settings.clahe, chosen.global_batch(settings.batch_size)
        augment, views = settings.augment, task.views
        train_data = training_dataset(train["path"], targets[0], size, clahe, batch, seed, augment, views)
        val_seed = settings.seed if views > 1 else None  # two views must differ in validation too
        val_data = training_dataset(val["path"], targets[1], size, clahe, batch, val_seed, augment, views)
        class_weight = None if task.loss is not None else _balanced_class_weight(targets[0].ravel())
        data = (train_data, val_data, class_weight)
        _fit_phases(model, task, state, data, out_dir, settings.patience, verbose, chosen.learning_rate)
    model_path = _export_best(task, out_dir, settings.options)
    result = TrainResult(model_path, state["history"], state["best_epoch"], _val_metrics(state))
    result.summary = write_records(out_dir, task, result, state, recorded, extra, train, val)
    return result


def _fit_phases(
    model: keras.Model,
    task: TrainingTask,
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
            callbacks=[EpochRecorder(out_dir, state, phase, task, patience)],
            shuffle=False,  # the dataset shuffles itself, seeded per epoch
            verbose=verbose,
        )


def _initial_model(task: TrainingTask, out_dir: Path, state: dict, weights, options: dict) -> keras.Model:
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


def _load_state(out_dir: Path, task: TrainingTask) -> dict | None:
    """The saved state of an interrupted run in `out_dir`, or None when there is nothing to resume."""
    path = out_dir / STATE
    if not path.is_file() or not (out_dir / CHECKPOINT).is_file():
        return None
    state = read_json_object(path)
    if state.get("task") != [task.kind, task.backbone, task.num_outputs]:
        raise InputError(f"{path}: the checkpoint there is from another task {state.get('task')}; use a new out_dir")
    return state


class EpochRecorder(keras.callbacks.Callback):
    """After every epoch: history, best weights, checkpoint and state on disk; early stopping on the monitor."""

    def __init__(self, out_dir: Path, state: dict, phase: Phase, task: TrainingTask, patience: int):
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


def _compile(model: keras.Model, task: TrainingTask, learning_rate: float) -> None:
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


def _export_best(task: TrainingTask, out_dir: Path, options: dict) -> Path:
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
