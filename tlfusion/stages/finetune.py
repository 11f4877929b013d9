"""The finetune stage: each backbone fine-tuned (binary, K-class or multi-label) or saved as configured."""

from __future__ import annotations

import json
import logging

import pandas as pd

from tlfusion.backbones.registry import plain_backbone
from tlfusion.console import progress
from tlfusion.fileio import write_atomic
from tlfusion.run.readers import check_keras_file
from tlfusion.stages.context import RunContext, run_classes

log = logging.getLogger("tlfusion")


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
    from tlfusion.training.task import TrainSettings

    experiment = run.experiment
    settings = TrainSettings(
        weights=entry.weights,
        image_size=experiment.image.size,
        clahe=experiment.image.clahe,
        seed=experiment.seed,
        options=entry.options,
        **experiment.finetune.model_dump(exclude={"enabled", "losses", "head"}),  # every other key is a setting
    )
    out_dir = run.paths.model(key).parent
    if experiment.task == "multilabel":
        from tlfusion.training.multilabel import finetune_choosing_loss

        losses, findings = experiment.finetune.losses, run.findings
        result, choice = finetune_choosing_loss(
            trainval, entry.name, out_dir, losses, settings, findings=findings, verbose=0
        )
        log.info("fine-tuning loss of %s: %s (validation AUROC %s)", key, choice["chosen"], choice["val_auc"])
        return result
    from tlfusion.training.finetune import finetune

    classes = run_classes(run) if experiment.task == "multiclass" else None
    head, positive = experiment.finetune.head, experiment.positive_class
    return finetune(
        trainval, entry.name, out_dir, settings, positive_class=positive, classes=classes, head=head, verbose=0
    )


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
