"""What every stage works with: the experiment, the run folder's paths and the data table the data stage wrote."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pandas as pd

from tlfusion.config.experiment import Experiment
from tlfusion.data.table import class_order
from tlfusion.models.names import FUSION
from tlfusion.run.paths import RunPaths
from tlfusion.run.readers import (
    read_class_predictions,
    read_class_selection,
    read_features,
    read_predictions,
    read_selection,
)


def digest(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def backbone_keys(experiment: Experiment) -> list[str]:
    """Unique, readable names for the experiment's backbones (`densenet121`, `densenet121_2`, ...)."""
    keys: list[str] = []
    for entry in experiment.backbones:
        key, number = entry.name.lower(), 2
        while key in keys:
            key, number = f"{entry.name.lower()}_{number}", number + 1
        keys.append(key)
    return keys


class RunContext:
    """One experiment's run folder as the stages see it."""

    def __init__(self, experiment: Experiment, paths: RunPaths, skip_bad: bool = False):
        self.experiment = experiment
        self.paths = paths
        self.skip_bad = skip_bad
        self.timings: dict[str, float] = {}
        self._table: pd.DataFrame | None = None

    @property
    def table(self) -> pd.DataFrame:
        """data/table.csv (kept in memory once read or written)."""
        if self._table is None:
            self._table = pd.read_csv(self.paths.table, dtype={"patient": str, "study": str})
        return self._table

    @table.setter
    def table(self, table: pd.DataFrame) -> None:
        self._table = table

    @property
    def has_table(self) -> bool:
        return self._table is not None

    def data_fingerprint(self) -> str:
        """A hash of what the table says about each image: content, label(s), split and patient."""
        columns = [c for c in ("sha256", "label", "labels", "split", "patient") if c in self.table.columns]
        return digest(self.table[columns].astype(str).values.tolist())

    @property
    def findings(self) -> list[str]:
        """A multi-label experiment's findings: its first source's `findings`, else the 14 of ChestX-ray14."""
        from tlfusion.data.findings import CHESTXRAY14_FINDINGS

        return list(self.experiment.data[0].findings or CHESTXRAY14_FINDINGS)

    @property
    def backbone_keys(self) -> list[str]:
        return backbone_keys(self.experiment)

    def load_features(self, keys: list[str]) -> tuple[np.ndarray, list[int]]:
        """The named backbones' features side by side, and each block's width."""
        blocks = [read_features(self.paths.features(key), len(self.table)) for key in keys]
        return np.hstack(blocks), [block.shape[1] for block in blocks]

    def feature_sets(self) -> dict[str, list[str]]:
        """Feature set -> backbones: each backbone alone (unless switched off) and, with several, their fusion."""
        keys = self.backbone_keys
        sets = {key: [key] for key in keys} if len(keys) == 1 or self.experiment.classifiers.single_backbones else {}
        if len(keys) > 1:
            sets[FUSION] = keys
        return sets

    def fit_outputs(self) -> tuple[dict, pd.DataFrame]:
        """The fit stage's selection record and predictions, checked (`tlfusion.run.readers`; a multiclass run's
        predictions have one probability column per class)."""
        if self.experiment.task == "multiclass":
            selection = read_class_selection(self.paths)
            models = set(selection["cv_scores"])
            return selection, read_class_predictions(self.paths, models, len(selection["classes"]))
        selection = read_selection(self.paths)
        return selection, read_predictions(self.paths, set(selection["thresholds"]))


def run_classes(run: RunContext) -> list[str]:
    """A multiclass run's classes in order (`data.table.class_order` of its table and `classes`)."""
    return class_order(run.table["label"], run.experiment.classes)


def fit_rows(table: pd.DataFrame) -> np.ndarray:
    """The training split's rows (train + val): what models are cross-validated and fitted on."""
    return table["split"].isin(["train", "val"]).to_numpy()
