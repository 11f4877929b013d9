"""The extract stage: each backbone's (cached) penultimate features of every table row."""

from __future__ import annotations

import logging

import numpy as np

from tlfusion.backbones.registry import plain_backbone
from tlfusion.fileio import write_atomic
from tlfusion.stages.context import RunContext

log = logging.getLogger("tlfusion")


def run_extract(run: RunContext) -> None:
    """features/<key>.npy: each backbone's (cached) features of every table row."""
    from tlfusion.features.extraction import extract_features

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
