"""Supervised in-domain pretraining of a backbone on several labelled X-ray sources (`tlfusion pretrain`).

The run writes what `training` lists into its run folder; `pretrain_and_ship` then copies the shippable files with a
model card (`model_cards`). The settings and sources come from a pretraining YAML
(`pretraining_config.PretrainingConfig`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlfusion import training
from tlfusion.data.pretraining import pretraining_table
from tlfusion.fileio import write_json
from tlfusion.model_cards import ship_pretrained
from tlfusion.pretraining_config import PretrainSettings, PretrainSource, load_pretraining_config
from tlfusion.pretraining_heads import head_layout, head_targets, output_names
from tlfusion.pretraining_losses import ContrastiveLoss, HeadMetric, MultiTaskLoss

_DEFAULTS = PretrainSettings()


def pretrain(
    table: pd.DataFrame,
    backbone: str,
    out_dir: str | Path,
    *,
    objective: str = _DEFAULTS.objective,
    sources: Sequence[PretrainSource] = (),
    temperature: float = _DEFAULTS.temperature,
    projection_dim: int = _DEFAULTS.projection_dim,
    weights: str | Path | None = _DEFAULTS.weights,
    image_size: int = _DEFAULTS.image_size,
    warmup_epochs: int = _DEFAULTS.warmup_epochs,
    epochs: int = _DEFAULTS.epochs,
    batch_size: int = _DEFAULTS.batch_size,
    learning_rate: float = _DEFAULTS.learning_rate,
    unfrozen_learning_rate: float | None = _DEFAULTS.unfrozen_learning_rate,
    patience: int = _DEFAULTS.patience,
    seed: int = _DEFAULTS.seed,
    resume: bool = False,
    augment: bool = _DEFAULTS.augment,
    clahe: bool = _DEFAULTS.clahe,
    batchnorm: str = _DEFAULTS.batchnorm,
    distribute: str = _DEFAULTS.distribute,
    options: Mapping[str, Any] | None = None,
    verbose: int = 1,
) -> training.TrainResult:
    """In-domain pretraining with one `objective` (`pretraining_config.Objective`): "softmax" over every `label` in
    the training rows, class-weighted; "multitask", a head per target of `sources` (the table's
    `data.pretraining.TARGET_PREFIX` columns), labels a row lacks masked; "contrastive", label-free NT-Xent at
    `temperature` over two augmented views of each image, through a `projection_dim`-wide head.

    `weights`: None (random init), "imagenet" or a tlfusion model file to continue from. The first
    `warmup_epochs` train the new head alone at `learning_rate`, the rest everything at `unfrozen_learning_rate`
    (default: `learning_rate`); `batchnorm` and `distribute` as in `training.finetune`. Early stopping on val
    loss after `patience` epochs without improvement (after the warm-up); the best epoch becomes `model.keras`.
    `options` go to `backbones.build_backbone` (e.g. `{"alpha": 0.35}`). The defaults are
    `pretraining_config.PretrainSettings`'.
    """
    arguments = dict(locals())  # before any other local: what train.json records
    train, val = training.train_val_rows(table)
    unfrozen_learning_rate = unfrozen_learning_rate or learning_rate
    schedule = training.phases(weights, warmup_epochs, epochs, learning_rate, unfrozen_learning_rate, batchnorm)
    objectives = {"softmax": _softmax_task, "multitask": _multitask_task, "contrastive": _contrastive_task}
    task, targets, extra = objectives[objective](arguments, train, val)
    task = replace(task, backbone=training.architecture(backbone), image_size=image_size, phases=schedule)
    settings = training.training_settings(arguments, unfrozen_learning_rate=unfrozen_learning_rate)
    settings.update(objective=objective, temperature=temperature, projection_dim=projection_dim)
    return training.run_task(task, train, val, targets, out_dir, settings, extra, resume, verbose)


def _task(kind: str, num_outputs: int, metric: str, **losses: Any) -> training.Task:
    """A pretraining task monitoring val loss; backbone, size and phases are filled in by `pretrain`."""
    return training.Task(kind, "", 0, num_outputs, (), monitor="val_loss", mode="min", metric=metric, **losses)


def _softmax_task(arguments: Mapping[str, Any], train: pd.DataFrame, val: pd.DataFrame) -> tuple:
    classes = sorted(train["label"].astype(str).unique())
    training.require_classes(classes, val, "pretrain")
    index = {name: i for i, name in enumerate(classes)}
    targets = tuple(part["label"].astype(str).map(index).to_numpy(np.int32) for part in (train, val))
    return _task("pretrain", len(classes), "accuracy"), targets, {"classes": classes}


def _multitask_task(arguments: Mapping[str, Any], train: pd.DataFrame, val: pd.DataFrame) -> tuple:
    if not arguments["sources"]:
        raise ValueError("pretrain: objective 'multitask' needs the sources that name the heads")
    heads = head_layout(arguments["sources"], train)
    metrics = tuple(HeadMetric(head, column) for column, head in enumerate(heads))
    width = sum(head.size for head in heads)
    task = _task("multitask", width, metrics[0].name, loss=MultiTaskLoss(heads), metrics=metrics)
    extra = {"classes": output_names(heads), "heads": [head.as_config() for head in heads]}
    return task, (head_targets(train, heads), head_targets(val, heads)), extra


def _contrastive_task(arguments: Mapping[str, Any], train: pd.DataFrame, val: pd.DataFrame) -> tuple:
    width = arguments["projection_dim"]
    loss = ContrastiveLoss(arguments["temperature"])
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
) -> training.TrainResult:
    """Build the combined table a pretraining YAML describes (`overrides` applied) and run `pretrain` on it into
    `run_dir`; `train.json` gains the per-source counts and the validated configuration."""
    config = load_pretraining_config(config_path, overrides)
    table = pretraining_table(config.sources, data_root or config.data_root, config.split, config.drop_splits)
    settings = config.settings()
    result = pretrain(table, backbone, run_dir, resume=resume, verbose=verbose, sources=config.sources, **settings)
    counts = table.groupby(["source", "split"]).size().unstack(fill_value=0)
    summary_path = Path(run_dir) / "train.json"
    summary = json.loads(summary_path.read_text())
    write_json(summary_path, {**summary, "sources": counts.to_dict(orient="index"), "config": config.model_dump()})
    return result


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
    pretrain_from_config(config, arch, run_dir, data_root, resume, overrides=overrides)
    return ship_pretrained(run_dir, out, command)
