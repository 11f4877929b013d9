"""Supervised in-domain pretraining of a backbone on several labelled X-ray sources (`tlfusion pretrain`).

The run writes what `training` lists into its run folder; `pretrain_and_ship` then copies the shippable files with a
model card (`model_cards`). The settings and sources come from a pretraining YAML
(`pretraining_config.PretrainingConfig`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlfusion import training
from tlfusion.data.pretraining import pretraining_table
from tlfusion.fileio import write_json
from tlfusion.model_cards import ship_pretrained
from tlfusion.pretraining_config import PretrainSettings, load_pretraining_config

_DEFAULTS = PretrainSettings()


def pretrain(
    table: pd.DataFrame,
    backbone: str,
    out_dir: str | Path,
    *,
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
    """Supervised pretraining: softmax over every `label` in the training rows, class-weighted.

    `weights`: None (random init), "imagenet" or a tlfusion model file to continue from. The first
    `warmup_epochs` train the new head alone at `learning_rate`, the rest everything at `unfrozen_learning_rate`
    (default: `learning_rate`); `batchnorm` and `distribute` as in `training.finetune`. Early stopping on val
    loss after `patience` epochs without improvement (after the warm-up); the best epoch becomes `model.keras`.
    `options` go to `backbones.build_backbone` (e.g. `{"alpha": 0.35}`). The defaults are
    `pretraining_config.PretrainSettings`'.
    """
    arguments = dict(locals())  # before any other local: what train.json records
    train, val = training.train_val_rows(table)
    classes = sorted(train["label"].astype(str).unique())
    training.require_classes(classes, val, "pretrain")
    index = {name: i for i, name in enumerate(classes)}
    unfrozen_learning_rate = unfrozen_learning_rate or learning_rate
    task = training.Task(
        kind="pretrain",
        backbone=training.architecture(backbone),
        image_size=image_size,
        num_outputs=len(classes),
        phases=training.phases(weights, warmup_epochs, epochs, learning_rate, unfrozen_learning_rate, batchnorm),
        monitor="val_loss",
        mode="min",
        metric="accuracy",
    )
    targets = tuple(part["label"].astype(str).map(index).to_numpy(np.int32) for part in (train, val))
    settings = training.training_settings(arguments, unfrozen_learning_rate=unfrozen_learning_rate)
    return training.run_task(task, train, val, targets, out_dir, settings, {"classes": classes}, resume, verbose)


def pretrain_from_config(
    config_path: str | Path,
    backbone: str,
    run_dir: str | Path,
    data_root: str | Path | None = None,
    resume: bool = False,
    verbose: int = 1,
) -> training.TrainResult:
    """Build the combined table a pretraining YAML describes and run `pretrain` on it into `run_dir`; `train.json`
    gains the per-source counts and the validated configuration."""
    config = load_pretraining_config(config_path)
    table = pretraining_table(config.sources, data_root or config.data_root, config.split, config.drop_splits)
    result = pretrain(table, backbone, run_dir, resume=resume, verbose=verbose, **config.settings())
    counts = table.groupby(["source", "split"]).size().unstack(fill_value=0)
    summary_path = Path(run_dir) / "train.json"
    summary = json.loads(summary_path.read_text())
    write_json(summary_path, {**summary, "sources": counts.to_dict(orient="index"), "config": config.model_dump()})
    return result


def pretrain_and_ship(
    config: str, arch: str, out: str, run_dir: str | None = None, data_root: str | None = None, resume: bool = False
) -> Path:
    """Pretrain `arch` as `config` describes (checkpoints in `run_dir`), then ship model + card into `out`."""
    run_dir = Path(run_dir or Path("runs") / f"pretrain_{Path(out).name}")
    command = " ".join(["tlfusion pretrain", config, "--arch", arch, "--out", out])
    pretrain_from_config(config, arch, run_dir, data_root, resume)
    return ship_pretrained(run_dir, out, command)
