"""Supervised in-domain pretraining of a backbone on several labelled X-ray sources (`tlfusion pretrain`).

The run writes what `training` lists into its run folder; `pretrain_and_ship` then copies the shippable files with a
model card (`model_cards`). The settings and sources come from a pretraining YAML
(`config.pretraining.PretrainingConfig`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlfusion.config.pretraining import PretrainSettings, PretrainSource, load_pretraining_config
from tlfusion.data.pretraining import pretraining_table
from tlfusion.training.loop import run_task
from tlfusion.training.model_cards import ship_pretrained
from tlfusion.training.pretraining_heads import head_layout, head_targets, output_names
from tlfusion.training.pretraining_losses import ContrastiveLoss, HeadMetric, MultiTaskLoss
from tlfusion.training.rows import architecture, require_classes, train_val_rows
from tlfusion.training.task import TaskKind, TrainingTask, TrainResult, TrainSettings

_DEFAULTS = PretrainSettings()


def pretrain(
    table: pd.DataFrame,
    backbone: str,
    out_dir: str | Path,
    settings: PretrainSettings = _DEFAULTS,
    *,
    sources: Sequence[PretrainSource] = (),
    options: Mapping[str, Any] | None = None,
    resume: bool = False,
    verbose: int = 1,
    record: Mapping[str, Any] | None = None,
) -> TrainResult:
    """In-domain pretraining with one objective (`settings.objective`, `config.pretraining.Objective`): "softmax"
    over every `label` in the training rows, class-weighted; "multitask", a head per target of `sources` (the
    table's `data.pretraining.TARGET_PREFIX` columns), labels a row lacks masked; "contrastive", label-free NT-Xent
    at `settings.temperature` over two augmented views of each image, through a `projection_dim`-wide head.

    The other settings train as `training.task.TrainSettings` say (`unfrozen_learning_rate` None:
    `learning_rate`); early stopping on val loss (after the warm-up), the best epoch becomes `model.keras`.
    `options` go to `backbones.registry.build_backbone` (e.g. `{"alpha": 0.35}`); `record` is added to train.json.
    """
    train, val = train_val_rows(table)
    trained = training_settings(settings, options)
    objectives = {"softmax": _softmax_task, "multitask": _multitask_task, "contrastive": _contrastive_task}
    task, targets, extra = objectives[settings.objective](settings, sources, train, val)
    task = replace(task, backbone=architecture(backbone), image_size=trained.image_size, phases=trained.phases())
    recorded = trained.record() | settings.model_dump(include={"objective", "temperature", "projection_dim"})
    extra = {**extra, **(record or {})}
    return run_task(task, (train, val), targets, out_dir, trained, recorded, extra, resume, verbose)


def training_settings(settings: PretrainSettings, options: Mapping[str, Any] | None = None) -> TrainSettings:
    """The `TrainSettings` of a pretraining run (`unfrozen_learning_rate` None: `learning_rate`)."""
    fields = settings.model_dump(include=set(TrainSettings.__dataclass_fields__))
    fields["unfrozen_learning_rate"] = settings.unfrozen_learning_rate or settings.learning_rate
    return TrainSettings(**fields, options=dict(options or {}))


def _task(kind: TaskKind, num_outputs: int, metric: str, **losses: Any) -> TrainingTask:
    """A pretraining task monitoring val loss; backbone, size and phases are filled in by `pretrain`."""
    return TrainingTask(kind, "", 0, num_outputs, (), monitor="val_loss", mode="min", metric=metric, **losses)


def _softmax_task(settings: PretrainSettings, sources, train: pd.DataFrame, val: pd.DataFrame) -> tuple:
    classes = sorted(train["label"].astype(str).unique())
    require_classes(classes, val, "pretrain")
    index = {name: i for i, name in enumerate(classes)}
    targets = tuple(part["label"].astype(str).map(index).to_numpy(np.int32) for part in (train, val))
    return _task("pretrain", len(classes), "accuracy"), targets, {"classes": classes}


def _multitask_task(settings: PretrainSettings, sources, train: pd.DataFrame, val: pd.DataFrame) -> tuple:
    if not sources:
        raise ValueError("pretrain: objective 'multitask' needs the sources that name the heads")
    heads = head_layout(sources, train)
    metrics = tuple(HeadMetric(head, column) for column, head in enumerate(heads))
    width = sum(head.size for head in heads)
    task = _task("multitask", width, metrics[0].name, loss=MultiTaskLoss(heads), metrics=metrics)
    extra = {"classes": output_names(heads), "heads": [head.as_config() for head in heads]}
    return task, (head_targets(train, heads), head_targets(val, heads)), extra


def _contrastive_task(settings: PretrainSettings, sources, train: pd.DataFrame, val: pd.DataFrame) -> tuple:
    width = settings.projection_dim
    loss = ContrastiveLoss(settings.temperature)
    task = _task("contrastive", width, "loss", loss=loss, views=2)
    targets = tuple(np.zeros((len(part), 1), np.float32) for part in (train, val))
    return task, targets, {"classes": [f"projection_{i}" for i in range(width)]}


def pretrain_from_config(
    config_path: str | Path,
    backbone: str,
    run_dir: str | Path,
    data_root: str | Path | None = None,
    resume: bool = False,
    verbose: int = 1,
    overrides: Sequence[str] = (),
) -> TrainResult:
    """Build the combined table a pretraining YAML describes (`overrides` applied) and run `pretrain` on it into
    `run_dir`; `train.json` gains the per-source counts and the validated configuration."""
    config = load_pretraining_config(config_path, overrides)
    table = pretraining_table(config.sources, data_root or config.data_root, config.split, config.drop_splits)
    counts = table.groupby(["source", "split"]).size().unstack(fill_value=0)
    record = {"sources": counts.to_dict(orient="index"), "config": config.model_dump()}
    settings = PretrainSettings(**config.settings())
    return pretrain(
        table, backbone, run_dir, settings, sources=config.sources, resume=resume, verbose=verbose, record=record
    )


def pretrain_and_ship(
    config: str,
    arch: str,
    out: str,
    run_dir: str | None = None,
    data_root: str | None = None,
    resume: bool = False,
    overrides: Sequence[str] = (),
) -> Path:
    """Pretrain `arch` as `config` describes (`overrides` applied; checkpoints in `run_dir`), then ship model +
    card into `out`."""
    run_dir = Path(run_dir or Path("runs") / f"pretrain_{Path(out).name}")
    settings = [argument for text in overrides for argument in ("--set", text)]
    command = " ".join(["tlfusion pretrain", config, "--arch", arch, *settings, "--out", out])
    result = pretrain_from_config(config, arch, run_dir, data_root, resume, overrides=overrides)
    return ship_pretrained(run_dir, out, command, result.summary)
