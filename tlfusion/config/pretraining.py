"""The pretraining YAML's schema (`tlfusion pretrain`): settings, CSV sources, the split each source alone would use
and the held-out policy; validated like an experiment (`config`), unknown keys are errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from tlfusion.config.experiment import Strict
from tlfusion.config.loading import apply_override, read_mapping, validate


class PretrainTarget(Strict):
    """One supervised head of a source (objective `multitask`): a CSV column read as classes or as a number."""

    column: str
    kind: Literal["classes", "regression"] = "classes"


class PretrainSplit(Strict):
    """`data.splits.assign_splits` arguments: the split an experiment on each source alone would use;
    `test_values`: rows whose `split_column` holds one of these form the test part (e.g. an upstream val part)."""

    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 0
    test_values: list[str] = Field(default_factory=list)


class PretrainSource(Strict):
    """One CSV source of a pretraining set; its labels become "<name>/<region>/<class>" ("<name>/<class>").

    `targets` (objective `multitask`): this source's heads, default one head of classes over `label_column`;
    `split`: this source's own split (default: the configuration's); `filters` as in an experiment's data section.
    """

    name: str
    csv: str
    path_column: str = "path"
    label_column: str = "label"
    patient_column: str | None = None
    split_column: str | None = None
    region_column: str | None = None
    regions: list[str] | None = None
    filters: dict[str, str | list[str]] = Field(default_factory=dict)
    class_names: dict[str, str] = Field(default_factory=dict)
    targets: list[PretrainTarget] = Field(default_factory=list)
    split: PretrainSplit | None = None

    @property
    def heads(self) -> list[PretrainTarget]:
        """The supervised heads of this source: `targets`, or classes over `label_column`."""
        return self.targets or [PretrainTarget(column=self.label_column)]

    @model_validator(mode="after")
    def _regions_need_column(self) -> PretrainSource:
        if self.regions and not self.region_column:
            raise ValueError("'regions' needs 'region_column' (the CSV column holding the region)")
        if self.split and self.split.test_values and not self.split_column:
            raise ValueError("'split.test_values' needs 'split_column' (the CSV column holding the upstream split)")
        return self


Objective = Literal["softmax", "multitask", "contrastive"]
"""softmax: one label space over every source; multitask: a head per source target, labels a source lacks
masked; contrastive: label-free, two augmented views of each image pulled together (NT-Xent)."""


class PretrainSettings(Strict):
    """How `pretraining.pretrain` trains (its defaults are these); `unfrozen_learning_rate` None: `learning_rate`."""

    objective: Objective = "softmax"
    temperature: float = Field(0.2, gt=0)
    """contrastive: the NT-Xent temperature."""
    projection_dim: int = Field(128, ge=2)
    """contrastive: the width of the projection (the `head` layer) the loss compares."""
    weights: str | None = None
    image_size: int = Field(128, ge=32, le=1024)
    warmup_epochs: int = Field(0, ge=0)
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    unfrozen_learning_rate: float | None = Field(None, gt=0)
    patience: int = Field(4, ge=1)
    seed: int = 0
    augment: bool = True
    clahe: bool = False
    batchnorm: Literal["auto", "train", "freeze"] = "auto"
    distribute: Literal["auto", "default", "mirrored", "multi_worker"] = "auto"
    """`tlfusion.training.distribution`: `batch_size` is per replica, the learning rates scale with the replicas."""


class PretrainingConfig(PretrainSettings):
    """One pretraining YAML (e.g. `experiments/pretrain_xray.yaml`): settings, sources and the held-out policy."""

    description: str = ""
    hold_out_policy: str = ""
    limits: str = ""
    data_root: str = "."
    sources: list[PretrainSource] = Field(min_length=1)
    split: PretrainSplit = Field(default_factory=PretrainSplit)
    drop_splits: list[str] = Field(default_factory=lambda: ["test"])

    def settings(self) -> dict[str, Any]:
        """The `PretrainSettings` fields, as keyword arguments of `pretraining.pretrain`."""
        return self.model_dump(include=set(PretrainSettings.model_fields))


def load_pretraining_config(path: str | Path, overrides: Sequence[str] = ()) -> PretrainingConfig:
    """Read, override (`--set epochs=4`) and validate a pretraining YAML; `data_root` and a weights file become
    absolute paths (relative ones resolve against the YAML's folder)."""
    path = Path(path)
    raw = read_mapping(path, "pretraining")
    for text in overrides:
        apply_override(raw, text)
    config = validate(PretrainingConfig, raw, path)
    home = path.parent.resolve()
    config.data_root = str((home / config.data_root).resolve())
    if config.weights not in (None, "imagenet"):
        config.weights = str((home / config.weights).resolve())
    return config
