"""The stages every task starts with: data (read, scan, split), finetune (backbones) and extract (features)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from tlfusion.console import progress
from tlfusion.data.table import class_order, scan_with_cache, split_table, with_binary_target, with_class_codes
from tlfusion.fileio import write_atomic, write_json
from tlfusion.runfiles import check_keras_file
from tlfusion.stages.context import RunContext

log = logging.getLogger("tlfusion")


def run_data(run: RunContext) -> None:
    """data/table.csv: the experiment's readable images, their target (binary or class code), split and (joined)
    patient."""
    from tlfusion.data.sources import read_sources, summarise
    from tlfusion.data.splits import content_groups
    from tlfusion.subgroups import check_columns

    experiment = run.experiment
    table = _scanned(run, read_sources(experiment.data))
    check_columns(table, experiment.evaluate.subgroups)  # before any backbone is trained for nothing
    if experiment.task == "binary":
        table = with_binary_target(table, experiment.positive_class)
    elif experiment.task == "multiclass":
        table = with_class_codes(table, class_order(table["label"], experiment.classes))
    table = split_table(table, experiment.split, experiment.seed)
    # Identical files under two patients are one patient from here on: CV folds, bootstrap and episodes.
    table["patient"] = content_groups(table)
    if "labels" in table.columns:
        table["labels"] = table["labels"].map("|".join)
    write_atomic(run.paths.table, lambda temp: table.to_csv(temp, index=False))
    summary = summarise(table if "label" in table.columns else table.assign(labels=table["labels"].str.split("|")))
    write_json(run.paths.data_summary, summary)
    run.table = table
    log.info("data: %d images, %d patients, splits %s", summary["images"], summary["patients"], summary["splits"])


def _scanned(run: RunContext, table: pd.DataFrame) -> pd.DataFrame:
    """`table` with each image's sha256, unreadable images left out (with --skip-bad) and listed."""
    hashes, bad = scan_with_cache(table["path"].tolist(), run.paths.scan_cache, run.skip_bad)
    table = table.assign(sha256=hashes)
    if bad:
        write_json(run.paths.skipped, [{"path": p, "reason": r} for p, r in bad])
        log.warning("skipped %d unreadable image(s), listed in data/skipped.json", len(bad))
    return table[table["sha256"] != ""].reset_index(drop=True)


def plain_backbone(entry, image_size: int, seed: int):
    """A backbone as configured (weights loaded), not fine-tuned; a random start is drawn from `seed`, so a run
    without fine-tuning is reproducible."""
    import keras

    from tlfusion.backbones import build_backbone

    keras.utils.set_random_seed(seed)
    return build_backbone(entry.name, image_size, entry.weights, **entry.options)


def run_finetune(run: RunContext) -> None:
    """backbones/<key>/model.keras: each backbone fine-tuned on train (early-stopped on val), or saved as is."""
    experiment, table = run.experiment, run.table
    trainval = table[table["split"].isin(["train", "val"])]
    pairs = list(zip(run.backbone_keys, experiment.backbones, strict=True))
    for key, entry in progress(pairs, "fine-tuning", lambda pair: pair[0]):
        if not experiment.finetune.enabled:
            write_atomic(run.paths.model(key), plain_backbone(entry, experiment.image.size, experiment.seed).save)
            continue
        log.info("fine-tuning %s (%s) on %d images", key, entry.weights or "random init", len(trainval))
        result = _finetune_backbone(run, key, entry, trainval)
        _log_training(key, result)


def _finetune_backbone(run: RunContext, key: str, entry, trainval: pd.DataFrame):
    """One backbone fine-tuned into `backbones/<key>/`: binary (one logit) or multi-label (one per finding, the loss
    chosen on the validation rows when `finetune.losses` names several)."""
    experiment = run.experiment
    common = {
        "weights": entry.weights,
        "image_size": experiment.image.size,
        "clahe": experiment.image.clahe,
        "seed": experiment.seed,
        "options": entry.options,
        "verbose": 0,
        **experiment.finetune.model_dump(exclude={"enabled", "losses", "head"}),  # every other key is an argument
    }
    out_dir = run.paths.model(key).parent
    if experiment.task == "multilabel":
        from tlfusion.multilabel_training import finetune_choosing_loss

        losses = experiment.finetune.losses
        result, choice = finetune_choosing_loss(trainval, entry.name, out_dir, losses, findings=run.findings, **common)
        log.info("fine-tuning loss of %s: %s (validation AUROC %s)", key, choice["chosen"], choice["val_auc"])
        return result
    from tlfusion.training import finetune

    classes = run_classes(run) if experiment.task == "multiclass" else None
    head, positive = experiment.finetune.head, experiment.positive_class
    return finetune(trainval, entry.name, out_dir, positive_class=positive, classes=classes, head=head, **common)


def run_classes(run: RunContext) -> list[str]:
    """A multiclass run's classes in order (`data.table.class_order` of its table and `classes`)."""
    return class_order(run.table["label"], run.experiment.classes)


def check_models(run: RunContext) -> None:
    """Each backbone's `model.keras` (what extract and the bundle load) is a complete Keras file."""
    for key in run.backbone_keys:
        check_keras_file(run.paths.model(key))


def _log_training(key: str, result) -> None:
    """Fine-tuning's outcome on the console, its epochs in run.log (Keras prints nothing: verbose=0)."""
    for epoch in result.history:
        log.debug("fine-tuning %s epoch %s", key, json.dumps(epoch, default=float))
    scores = ", ".join(f"{name.removeprefix('val_')} {value:.3f}" for name, value in result.val_metrics.items())
    log.info("fine-tuned %s: %d epochs, best epoch %d (val %s)", key, len(result.history), result.best_epoch, scores)


def run_extract(run: RunContext) -> None:
    """features/<key>.npy: each backbone's (cached) features of every table row."""
    from tlfusion.features import extract_features

    experiment = run.experiment
    for key, entry in zip(run.backbone_keys, experiment.backbones, strict=True):
        fine_tuned = run.paths.model(key)
        model = fine_tuned if fine_tuned.is_file() else plain_backbone(entry, experiment.image.size, experiment.seed)
        features = extract_features(
            model,
            run.table["path"].tolist(),
            experiment.image.size,
            clahe=experiment.image.clahe,
            batch_size=experiment.features.batch_size,
            cache_dir=run.paths.cache,
            engine=experiment.features.engine,
            stages=experiment.features.stages,
            scheduler=experiment.features.scheduler,
            flip=experiment.features.flip,
        )
        write_atomic(run.paths.features(key), lambda temp, f=features: np.save(temp.open("wb"), f))
        log.info("features %s: %s", key, features.shape)
