"""Fine-tuning of tlfusion backbones: binary, K-class (softmax or ordinal head), on the shared loop (`training.loop`).

`finetune` and `pretraining.pretrain` take a table with the `data.sources` columns whose `split` is "train" /
"val" (other rows are ignored) and write into `out_dir`:

- `model.keras`: the best epoch (lowest val loss for pretraining, highest val AUC for fine-tuning), a plain
  float32 tlfusion backbone that `backbones.registry.load_model_file` accepts;
- `checkpoint.keras` + `state.json`: the last finished epoch with its optimizer, for `resume=True`;
- `history.csv`, `curves.png`, `train.json` (settings, data counts, best epoch, val metrics, wall time) and
  `seen_images.txt` (sha256 of every training and validation image, for leakage checks downstream).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import pandas as pd

from tlfusion.errors import InputError
from tlfusion.training.loop import run_task
from tlfusion.training.rows import architecture, require_classes, train_val_rows
from tlfusion.training.task import DEFAULT_SETTINGS, TrainingTask, TrainResult, TrainSettings


def finetune(
    table: pd.DataFrame,
    backbone: str,
    out_dir: str | Path,
    settings: TrainSettings = DEFAULT_SETTINGS,
    *,
    positive_class: str | None = None,
    classes: Sequence[str] | None = None,
    head: Literal["softmax", "ordinal"] = "softmax",
    resume: bool = False,
    verbose: int = 1,
) -> TrainResult:
    """Binary fine-tuning (`positive_class` vs the rest) of a backbone as `settings` say (`TrainSettings`).

    The epoch with the best val AUC becomes `model.keras`; early stopping applies after the warm-up.
    With `classes` (K >= 3, in order) instead of `positive_class`, the fine-tuning is K-class (`head` "softmax":
    K logits, class-weighted cross-entropy; "ordinal": K-1 cumulative logits P(class > k), cross-entropy on each)
    and the epoch with the lowest val loss becomes `model.keras`.
    """
    train, val = train_val_rows(table)
    if classes is not None:
        task, targets, extra = _class_task(train, val, list(classes), head, architecture(backbone), settings)
        recorded = settings.record(classes=list(classes), head=head)
        return run_task(task, (train, val), targets, out_dir, settings, recorded, extra, resume, verbose)
    if positive_class is None:
        raise ValueError("finetune: give positive_class (binary) or classes (multi-class)")
    task, targets = _binary_task(train, val, str(positive_class), architecture(backbone), settings)
    extra = {"classes": [f"not {positive_class}", str(positive_class)]}
    recorded = settings.record(positive_class=str(positive_class))
    return run_task(task, (train, val), targets, out_dir, settings, recorded, extra, resume, verbose)


def _binary_task(
    train: pd.DataFrame, val: pd.DataFrame, positive_class: str, backbone: str, settings: TrainSettings
) -> tuple[TrainingTask, tuple[np.ndarray, np.ndarray]]:
    """The binary fine-tuning task (one logit, val AUC monitored) and its (train, val) targets."""
    labels = set(train["label"].astype(str))
    if positive_class not in labels:
        raise InputError(f"finetune: positive_class {positive_class!r} is not a training label ({sorted(labels)})")
    require_classes(sorted(labels), val, "finetune")
    if val["label"].astype(str).eq(positive_class).nunique() < 2:
        raise InputError(f"finetune: the 'val' rows need both {positive_class!r} and other labels for a val AUC")
    task = TrainingTask(
        kind="finetune",
        backbone=backbone,
        image_size=settings.image_size,
        num_outputs=1,
        phases=settings.phases(),
        monitor="val_auc",
        mode="max",
        metric="auc",
    )
    targets = tuple(
        (part["label"].astype(str) == positive_class).to_numpy(np.float32)[:, None] for part in (train, val)
    )
    return task, targets


def _class_task(
    train: pd.DataFrame, val: pd.DataFrame, classes: list[str], head: str, backbone: str, settings: TrainSettings
) -> tuple[TrainingTask, tuple[np.ndarray, np.ndarray], dict[str, Any]]:
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
    common = {"backbone": backbone, "image_size": settings.image_size, "phases": settings.phases()}
    common |= {"monitor": "val_loss", "mode": "min"}
    if head == "softmax":
        task = TrainingTask(kind="multiclass", num_outputs=len(classes), metric="accuracy", **common)
        return task, codes, {"classes": classes, "head": head}
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    task = TrainingTask(kind="ordinal", num_outputs=len(classes) - 1, metric="loss", loss=loss, **common)
    cumulative = tuple((code[:, None] > np.arange(len(classes) - 1)).astype(np.float32) for code in codes)
    # output k is the logit of P(class > classes[k]), i.e. of "classes[k + 1] or above"
    return task, cumulative, {"classes": classes, "head": head, "outputs": classes[1:]}
