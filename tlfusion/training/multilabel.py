"""Multi-label fine-tuning: one sigmoid output per finding, trained with binary cross-entropy, class-balanced BCE
or the asymmetric loss; with several losses, each is trained and the one with the best validation mean AUROC kept.

The result is a plain tlfusion backbone file (`model.keras`, head of one logit per finding): features come from its
penultimate layer as for every other backbone. The choice between losses uses the validation rows only.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from keras import ops

from tlfusion.data.findings import label_matrix
from tlfusion.errors import InputError
from tlfusion.fileio import write_atomic, write_json
from tlfusion.semantic.metric_learning import bce_loss
from tlfusion.training.loop import MODEL, run_task
from tlfusion.training.provenance import SEEN_IMAGES
from tlfusion.training.records import TRAIN_JSON
from tlfusion.training.rows import architecture, train_val_rows
from tlfusion.training.task import DEFAULT_SETTINGS, TrainingTask, TrainResult, TrainSettings

LOSSES = ("bce", "balanced", "asymmetric")
"""`bce`: plain BCE; `balanced`: BCE with positives weighted n_neg / n_pos per finding (training rows);
`asymmetric`: the asymmetric loss (Ridnik et al., ICCV 2021) with gamma_neg 4, gamma_pos 0 and margin 0.05."""
CHOICE = "loss_choice.json"
MAX_POS_WEIGHT = 50.0


@keras.saving.register_keras_serializable(package="tlfusion")
class MultilabelLoss(keras.losses.Loss):
    """A multi-label loss on logits [n, C]: `kind` one of `LOSSES` (`pos_weight` [C] for "balanced")."""

    def __init__(
        self,
        kind: str = "bce",
        pos_weight: Sequence[float] | None = None,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        margin: float = 0.05,
        name: str = "multilabel",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if kind not in LOSSES:
            raise InputError(f"finetune.losses: unknown loss {kind!r}; known: {list(LOSSES)}")
        self.kind, self.pos_weight = kind, None if pos_weight is None else [float(w) for w in pos_weight]
        self.gamma_neg, self.gamma_pos, self.margin = gamma_neg, gamma_pos, margin

    def call(self, y_true, y_pred):
        logits = ops.cast(y_pred, "float32")
        if self.kind == "asymmetric":
            return asymmetric_loss(y_true, logits, self.gamma_neg, self.gamma_pos, self.margin)
        weight = self.pos_weight if self.kind == "balanced" else None
        return bce_loss(y_true, logits, None if weight is None else ops.convert_to_tensor(weight, "float32"))

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "pos_weight": self.pos_weight,
            "gamma_neg": self.gamma_neg,
            "gamma_pos": self.gamma_pos,
            "margin": self.margin,
        }


def asymmetric_loss(y_true, logits, gamma_neg: float = 4.0, gamma_pos: float = 0.0, margin: float = 0.05):
    """Asymmetric loss: L = -1/(N C) sum_ic [y (1-p)^g+ log p + (1-y) p_m^g- log(1 - p_m)], p_m = max(p - m, 0).

    Easy negatives (p below the margin) are dropped and the others down-weighted, so the many negatives of a
    multi-label set do not dominate the few positives.
    """
    y = ops.cast(y_true, logits.dtype)
    p = ops.sigmoid(logits)
    shifted = ops.maximum(p - margin, 0.0)
    positive = y * (1.0 - p) ** gamma_pos * ops.log_sigmoid(logits)
    negative = (1.0 - y) * shifted**gamma_neg * ops.log(ops.maximum(1.0 - shifted, 1e-8))
    return -ops.mean(positive + negative)


def positive_weights(Y: np.ndarray) -> list[float]:
    """n_neg / n_pos of each finding (a finding without positives: 1), capped at `MAX_POS_WEIGHT`."""
    positives = Y.sum(axis=0)
    ratio = np.where(positives > 0, (len(Y) - positives) / np.maximum(positives, 1), 1.0)
    return np.minimum(ratio, MAX_POS_WEIGHT).round(4).tolist()


def finetune_multilabel(
    table: pd.DataFrame,
    backbone: str,
    out_dir: str | Path,
    settings: TrainSettings = DEFAULT_SETTINGS,
    *,
    findings: Sequence[str],
    loss: str = "bce",
    resume: bool = False,
    verbose: int = 1,
) -> TrainResult:
    """Fine-tune `backbone` with a head of one logit per finding (the table's `labels`, '|'-joined) and `loss`;
    early stopping and the best epoch follow the validation mean AUROC (Keras `AUC(multi_label=True)`)."""
    train, val = train_val_rows(table.assign(label=table["labels"].fillna("")))
    targets = tuple(label_matrix(part, findings) for part in (train, val))
    if (targets[0].sum(axis=0) == 0).all():
        raise InputError("finetune: no training image has any of the findings")
    pos_weight = positive_weights(targets[0]) if loss == "balanced" else None
    task = TrainingTask(
        kind="multilabel",
        backbone=architecture(backbone),
        image_size=settings.image_size,
        num_outputs=len(findings),
        phases=settings.phases(),
        monitor="val_auc",
        mode="max",
        metric="auc",
        loss=MultilabelLoss(loss, pos_weight),
        metrics=(keras.metrics.AUC(multi_label=True, num_labels=len(findings), from_logits=True, name="auc"),),
    )
    extra = {"findings": list(findings), "pos_weight": pos_weight, "positives": _positives(targets, findings)}
    return run_task(task, (train, val), targets, out_dir, settings, settings.record(loss=loss), extra, resume, verbose)


def _positives(targets: tuple[np.ndarray, np.ndarray], findings: Sequence[str]) -> dict[str, dict[str, int]]:
    return {
        part: dict(zip(findings, Y.sum(axis=0).astype(int).tolist(), strict=True))
        for part, Y in zip(("train", "val"), targets, strict=True)
    }


def finetune_choosing_loss(
    table: pd.DataFrame, backbone: str, out_dir: str | Path, losses: Sequence[str], settings: TrainSettings, **arguments
) -> tuple[TrainResult, dict]:
    """`finetune_multilabel` with each of `losses` (in `out_dir/<loss>/` when more than one); the best validation
    mean AUROC's model is copied to `out_dir/model.keras` and the choice written to `out_dir/loss_choice.json`."""
    out_dir = Path(out_dir)
    if len(losses) == 1:
        result = finetune_multilabel(table, backbone, out_dir, settings, loss=losses[0], **arguments)
        choice = {"chosen": losses[0], "val_auc": {losses[0]: result.val_metrics.get("val_auc")}}
    else:
        results = {
            loss: finetune_multilabel(table, backbone, out_dir / loss, settings, loss=loss, **arguments)
            for loss in losses
        }
        scores = {loss: result.val_metrics.get("val_auc") for loss, result in results.items()}
        chosen = max(scores, key=lambda loss: -1.0 if scores[loss] is None else scores[loss])
        result = results[chosen]
        for name in (MODEL, SEEN_IMAGES, TRAIN_JSON):
            write_atomic(out_dir / name, lambda temp, source=out_dir / chosen / name: shutil.copyfile(source, temp))
        choice = {"chosen": chosen, "val_auc": scores}
    choice["chosen_on"] = "validation mean AUROC of the fine-tuned sigmoid head (Keras AUC, multi_label)"
    write_json(out_dir / CHOICE, choice)
    return result, choice
