"""What a training run is: its task (outputs, phases, monitor), its settings, its table checks and its result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tlfusion.config.experiment import FinetuneSpec, ImageSpec
from tlfusion.errors import InputError

_FINETUNE = FinetuneSpec()  # the defaults of `TrainSettings`: those of an experiment's `finetune` and `image` sections


_IMAGE = ImageSpec()


Trainable = Literal["all", "head", "all_but_batchnorm"]
"""What a phase trains: everything, the head alone (backbone frozen), or all but BatchNorm (kept in inference mode)."""


TaskKind = Literal["finetune", "multiclass", "ordinal", "multilabel", "pretrain", "multitask", "contrastive"]
"""`finetune`: one logit; `multiclass`/`pretrain`: softmax over classes; `ordinal`: K-1 cumulative logits;
`multilabel`: one sigmoid per finding; `multitask`, `contrastive`: the pretraining objectives of those names."""


@dataclass(frozen=True)
class TrainSettings:
    """How a backbone trains (`finetune`, `multilabel.finetune_multilabel`, `pretraining.pretrain`).

    `weights`: None (random init), "imagenet", or a tlfusion `.keras` / `.weights.h5` file (its head is replaced).
    `epochs` counts every epoch: the first `warmup_epochs` train only the head at `learning_rate`, the rest
    everything at `unfrozen_learning_rate`. `batchnorm`: "freeze" keeps BatchNorm layers in inference mode once
    unfrozen, "train" trains them, "auto" freezes them from pretrained weights and trains them from random init.
    `distribute` picks the `tf.distribute` strategy (`training.distribution`: `batch_size` per replica, learning
    rates x replicas). `options` go to `backbones.registry.build_backbone` (e.g. `{"alpha": 0.35}`). The defaults
    are an experiment's (`config.FinetuneSpec`, `config.ImageSpec`).
    """

    weights: str | Path | None = None
    image_size: int = _IMAGE.size
    warmup_epochs: int = _FINETUNE.warmup_epochs
    epochs: int = _FINETUNE.epochs
    batch_size: int = _FINETUNE.batch_size
    learning_rate: float = _FINETUNE.learning_rate
    unfrozen_learning_rate: float = _FINETUNE.unfrozen_learning_rate
    patience: int = _FINETUNE.patience
    seed: int = 0
    augment: bool = True
    clahe: bool = _IMAGE.clahe
    batchnorm: Literal["auto", "train", "freeze"] = _FINETUNE.batchnorm
    distribute: Literal["auto", "default", "mirrored", "multi_worker"] = _FINETUNE.distribute
    options: Mapping[str, Any] = field(default_factory=dict)

    def record(self, **changed: Any) -> dict[str, Any]:
        """What `train.json` records: `weights` as text, every other setting, `changed` values, then `options`."""
        recorded = {
            name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("weights", "options")
        }
        weights = None if self.weights is None else str(self.weights)
        return {"weights": weights, **recorded, **changed, "options": dict(self.options or {})}

    def phases(self) -> tuple[Phase, ...]:
        """Head-only warm-up at `learning_rate`, then everything at `unfrozen_learning_rate` (early stopping there)."""
        return phases(
            self.weights,
            self.warmup_epochs,
            self.epochs,
            self.learning_rate,
            self.unfrozen_learning_rate,
            self.batchnorm,
        )


@dataclass
class TrainResult:
    """What a training run produced: the best model file, per-epoch history, best epoch (1-based), its val metrics."""

    model_path: Path
    history: list[dict[str, Any]]
    best_epoch: int
    val_metrics: dict[str, float]
    summary: dict[str, Any] = field(default_factory=dict)
    """What the run's train.json holds (`training.records.write_records`)."""


@dataclass(frozen=True)
class Phase:
    """One stretch of epochs with one learning rate and one set of trainable layers."""

    name: Literal["warmup", "unfrozen"]
    end_epoch: int  # epochs finished (counted from the run's start) when this phase ends
    learning_rate: float
    trainable: Trainable
    early_stopping: bool


DEFAULT_SETTINGS = TrainSettings()
"""An experiment's default training settings."""


@dataclass(frozen=True)
class TrainingTask:
    """What a training run optimises: the outputs, the phases, the monitored metric and (optionally) the loss."""

    kind: TaskKind
    backbone: str
    image_size: int
    num_outputs: int
    phases: tuple[Phase, ...]
    monitor: str
    mode: Literal["min", "max"]
    metric: str  # the metric plotted beside the loss
    loss: Any = None  # a Keras loss replacing the kind's own (its `metrics` beside it), e.g. `pretraining_losses`
    metrics: tuple = ()
    views: int = 1  # 2: each training image as two augmented views in a row (`data.images.training_dataset`)


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
