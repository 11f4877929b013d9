"""Images a backbone was pretrained on (its `seen_images.txt`), counted among the images a run evaluates."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from tlfusion.config.experiment import Experiment
from tlfusion.errors import InputError
from tlfusion.stages.context import backbone_keys
from tlfusion.training.provenance import SEEN_IMAGES, read_seen_images

log = logging.getLogger("tlfusion")


def seen_in_training(experiment: Experiment, table: pd.DataFrame) -> dict[str, int]:
    """Backbone key -> how many of the table's images are in its weights' `seen_images.txt` (backbones without a
    local weights file are left out; a weights file without the list is warned about and left out)."""
    images = set(table["sha256"])
    seen = {}
    for key, entry in zip(backbone_keys(experiment), experiment.backbones, strict=True):
        if not entry.weights or entry.weights == "imagenet":
            continue
        seen_file = Path(entry.weights).parent / SEEN_IMAGES
        if not seen_file.is_file():
            log.warning("%s: no seen_images.txt beside %s: cannot check what it was trained on", key, entry.weights)
            continue
        seen[key] = len(images & read_seen_images(seen_file))
    return seen


def check_unseen(experiment: Experiment, table: pd.DataFrame) -> None:
    """Refuse a few-shot evaluation on images a backbone was trained on (its `seen_images.txt`)."""
    for key, count in seen_in_training(experiment, table).items():
        if count:
            raise InputError(
                f"backbones.{key}: {count} evaluated image(s) were in its training data (seen_images.txt beside "
                f"its weights); use an extractor pretrained with this data set held out"
            )


def warn_if_test_seen(seen: dict[str, int]) -> None:
    """A loud warning per backbone that was trained on test images: its scores there are optimistic."""
    for key, count in seen.items():
        if count:
            log.warning(
                "backbones.%s was pretrained on %d test image(s) (identical files, by sha256): test scores are "
                "optimistic; hold the test images out of pretraining or change the split",
                key,
                count,
            )
