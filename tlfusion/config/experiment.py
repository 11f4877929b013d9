"""Experiment schema (validated; unknown keys are errors), YAML loading and `--set key=value` overrides."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path, PurePath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tlfusion.config import names as registry_names
from tlfusion.config.loading import apply_override, did_you_mean, read_mapping, validate
from tlfusion.errors import InputError


def _known(names: list[str], registry: Iterable[str], what: str) -> list[str]:
    unknown = [name for name in names if name not in registry]
    if unknown:
        hint = did_you_mean(unknown[0], registry)
        raise ValueError(f"unknown {what} {unknown}{hint}; known: {sorted(registry)}")
    return names


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class DataSpec(Strict):
    """One dataset on disk, read by `tlfusion.data.sources.read_source` with the reader of its `format`."""

    format: Literal["mura", "folder", "csv", "chestxray14"]
    root: str
    csv: str | None = None
    path_column: str = "path"
    label_column: str = "label"
    patient_column: str | None = None
    study_column: str | None = None
    split_column: str | None = None
    region_column: str | None = None
    regions: list[str] | None = None
    filters: dict[str, str | list[str]] = Field(default_factory=dict)
    label_map: dict[str, str] | None = None
    findings: list[str] | None = None
    extra_columns: list[str] = Field(default_factory=list)
    """CSV format: columns kept in the data table as they are (e.g. `hardware`, `sex`), for `evaluate.subgroups`."""
    one_hot_columns: dict[str, list[str]] = Field(default_factory=dict)
    """CSV format: a new column from 0/1 flag columns, e.g. `{view: [frontal, lateral, oblique]}`: each row names
    its flagged columns, joined by "+" ("frontal+lateral"; "" when none is)."""
    follow_symlinks: bool = False
    """Read files whose links lead out of `root` (by default no file outside the data root is read)."""
    patient_pattern: str | None = None
    """Folder format: a regular expression searched in each image's path below its class folder (`p17_2.png`,
    `p17/2.png`); the patient id is its group `patient`, else its first group, else the whole match. Without it
    each image is its own patient."""

    @field_validator("patient_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"not a regular expression ({error})") from None
        return pattern

    @model_validator(mode="after")
    def _csv_needed(self) -> DataSpec:
        if self.format in ("csv", "chestxray14") and not self.csv:
            raise ValueError(f"format {self.format!r} needs 'csv' (the labels file, relative to 'root')")
        if self.patient_pattern is not None and self.format != "folder":
            raise ValueError(f"patient_pattern is for format 'folder'; format {self.format!r} has patient columns")
        if (self.extra_columns or self.one_hot_columns) and self.format != "csv":
            raise ValueError(f"extra_columns and one_hot_columns are for format 'csv', not {self.format!r}")
        return self


class SplitSpec(Strict):
    """Patient-grouped train / val / test split."""

    test_fraction: float | None = Field(0.2, gt=0, lt=1)
    test_split: list[str] = Field(default_factory=list, description="source split values that form the test set")
    val_fraction: float = Field(0.2, ge=0, lt=1)
    group: Literal["patient", "study"] = "patient"


class ImageSpec(Strict):
    size: int = Field(224, ge=32, le=1024)
    clahe: bool = False


class BackboneEntry(Strict):
    name: str
    weights: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return _known([name.lower()], registry_names.BACKBONES, "backbone")[0]


class FinetuneSpec(Strict):
    """`epochs` counts every epoch; the first `warmup_epochs` train only the head (backbone frozen).

    `batchnorm`: "freeze" keeps BatchNorm statistics once unfrozen, "train" re-estimates them, "auto" freezes them
    from pretrained weights and trains them from random init. `distribute`: the `tf.distribute` strategy
    (`tlfusion.training.distribution`; `batch_size` is then per replica and the learning rates scale with the replicas).
    """

    enabled: bool = True
    warmup_epochs: int = Field(2, ge=0)
    epochs: int = Field(8, ge=0)
    learning_rate: float = Field(1e-3, gt=0)
    unfrozen_learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=1)
    patience: int = Field(3, ge=1)
    batchnorm: Literal["auto", "train", "freeze"] = "auto"
    distribute: Literal["auto", "default", "mirrored", "multi_worker"] = "auto"
    losses: list[Literal["bce", "balanced", "asymmetric"]] = Field(default_factory=lambda: ["bce"], min_length=1)
    """Multi-label experiments: the fine-tuning losses (`tlfusion.training.multilabel.LOSSES`); with several, each
    is trained and the one with the best validation mean AUROC kept. Binary fine-tuning uses BCE."""
    head: Literal["softmax", "ordinal"] = "softmax"
    """Multi-class tasks: the head fine-tuning trains, a K-way softmax or (ordinal tasks) K-1 cumulative logits
    (P(grade > k), `training.finetune`). Binary tasks train one logit whatever this says, so it must stay softmax."""


class FeaturesSpec(Strict):
    standardize: bool = True
    l2: bool = False
    pca: int | float | None = None
    engine: Literal["auto", "keras", "onnx"] = "auto"
    batch_size: int = Field(32, ge=1)
    stages: int = Field(1, ge=1)
    """Resolution stages pooled per backbone (`tlfusion.backbones.registry.feature_model`); more than one: few-shot
    only."""
    flip: bool = False
    """Test-time augmentation: each image's features are the mean of its own and its left-right mirror's."""
    scheduler: str | None = Field(None, exclude=True)
    """A Dask scheduler address (`tcp://host:8786`, `tlfusion.features.cluster`) to extract on; where features are
    computed does not change them, so it is no part of the stage's key (excluded from `model_dump`)."""


class ClassifySpec(Strict):
    models: list[str] = Field(default_factory=lambda: ["lr", "svm", "rf", "knn", "xgb", "vote"])
    cv: int = Field(5, ge=2)
    scoring: Literal[
        "kappa", "auroc", "f1", "accuracy", "balanced_accuracy", "macro_f1", "quadratic_kappa", "macro_auroc"
    ] = "kappa"
    """Binary: kappa, auroc, f1 or accuracy. Multi-class: accuracy, balanced_accuracy, macro_f1, kappa,
    quadratic_kappa or macro_auroc (default quadratic_kappa when ordinal, else macro_f1)."""
    single_backbones: bool = True

    @field_validator("models")
    @classmethod
    def _registered(cls, models: list[str]) -> list[str]:
        return _known(models, registry_names.CLASSIFIERS, "classifier")


class EvaluateSpec(Strict):
    study_aggregation: Literal["mean", "max"] | None = None
    bootstrap: int = Field(1000, ge=0)
    calibration: Literal["sigmoid", "isotonic"] | None = None
    """Recalibrate each model's probabilities (`tlfusion.evaluation.calibration`), fitted on its out-of-fold
    probabilities: the report shows Brier and ECE before and after; the bundle carries the selected model's (part of
    fit's key)."""
    subgroups: list[str] = Field(default_factory=list)
    """Data-table columns (view, hardware, source, region, ...): the selected model's metrics per value of each."""


class ExplainSpec(Strict):
    enabled: bool = True
    cases: int = Field(8, ge=0)
    methods: list[Literal["gradcam", "lime"]] = Field(default_factory=lambda: ["gradcam", "lime"])
    lime_samples: int = Field(1000, ge=10)


class FewshotSpec(Strict):
    ways: int = Field(2, ge=2)
    shots: int = Field(5, ge=1)
    queries: int = Field(15, ge=1)
    episodes: int = Field(600, ge=2)
    classifier: str = "prototype"
    classes: list[str] | None = None
    shots_curve: list[int] = Field(default_factory=lambda: [1, 5, 10, 20])

    @field_validator("classifier")
    @classmethod
    def _registered(cls, classifier: str) -> str:
        return _known([classifier], registry_names.FEWSHOT_CLASSIFIERS, "few-shot classifier")[0]


class SemanticSpec(Strict):
    label_vectors: str = "chestxray14_minilm"
    losses: list[str] = Field(default_factory=lambda: ["bce", "dual_weighted", "focused_euclidean"])
    unseen: list[str] = Field(default_factory=list)
    dim: int = Field(128, ge=2)
    epochs: int = Field(60, ge=1)

    @field_validator("losses")
    @classmethod
    def _registered(cls, losses: list[str]) -> list[str]:
        return _known(losses, registry_names.LOSSES, "loss")


class Experiment(Strict):
    """One experiment YAML."""

    name: str
    task: Literal["binary", "multiclass", "fewshot", "multilabel"] = "binary"
    seed: int = 0
    data: list[DataSpec]
    positive_class: str | None = None
    classes: list[str] | None = None
    """Multi-class tasks: the class order (lowest grade first when ordinal); default the sorted label names
    (numerically when every name is a number)."""
    ordinal: bool = False
    """Multi-class tasks: the classes are ordered grades (selection by quadratic kappa, ordinal head allowed)."""
    split: SplitSpec = Field(default_factory=SplitSpec)
    image: ImageSpec = Field(default_factory=ImageSpec)
    backbones: list[BackboneEntry] = Field(min_length=1)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    features: FeaturesSpec = Field(default_factory=FeaturesSpec)
    classifiers: ClassifySpec = Field(default_factory=ClassifySpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    explain: ExplainSpec = Field(default_factory=ExplainSpec)
    fewshot: FewshotSpec = Field(default_factory=FewshotSpec)
    semantic: SemanticSpec = Field(default_factory=SemanticSpec)

    @model_validator(mode="before")
    @classmethod
    def _data_as_list(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("data"), dict):
            values = {**values, "data": [values["data"]]}
        return values

    @model_validator(mode="before")
    @classmethod
    def _multiclass_scoring(cls, values: Any) -> Any:
        """A multi-class experiment without `classifiers.scoring` selects by quadratic kappa (ordinal) or macro-F1."""
        if not isinstance(values, dict) or values.get("task") != "multiclass":
            return values
        classifiers = values.get("classifiers") or {}
        if isinstance(classifiers, dict) and "scoring" not in classifiers:
            scoring = "quadratic_kappa" if values.get("ordinal") is True else "macro_f1"
            values = {**values, "classifiers": {**classifiers, "scoring": scoring}}
        return values

    @model_validator(mode="after")
    def _binary_needs_positive(self) -> Experiment:
        if self.task == "binary" and not self.positive_class:
            raise ValueError("a binary experiment needs 'positive_class' (the label that counts as positive)")
        return self

    @model_validator(mode="after")
    def _task_keys(self) -> Experiment:
        """Each task's own keys: classes / ordinal / finetune.head and the scorings that fit it."""
        if self.task == "multiclass":
            _check_multiclass(self)
        else:
            for key, value in (("classes", self.classes), ("ordinal", self.ordinal)):
                if value:
                    raise ValueError(f"{key}: is for task 'multiclass', not {self.task!r}")
            if self.finetune.head != "softmax":
                raise ValueError(f"finetune.head: 'ordinal' is for ordinal multiclass tasks, not {self.task!r}")
        if self.task == "binary" and self.classifiers.scoring not in BINARY_SCORINGS:
            raise ValueError(
                f"classifiers.scoring: {self.classifiers.scoring!r} is for multiclass tasks; "
                f"a binary experiment takes one of {list(BINARY_SCORINGS)}"
            )
        return self

    @model_validator(mode="after")
    def _stages_for_fewshot(self) -> Experiment:
        if self.features.stages > 1 and self.task != "fewshot":
            raise ValueError(
                "features.stages > 1 (multi-scale features) is for few-shot experiments; "
                f"a {self.task} experiment's bundle and classifiers use the penultimate features"
            )
        return self


BINARY_SCORINGS = ("kappa", "auroc", "f1", "accuracy")


MULTICLASS_SCORINGS = registry_names.CLASS_METRICS


def _check_multiclass(experiment: Experiment) -> None:
    """ValueError naming the key when a multiclass experiment sets what only binary tasks take."""
    if experiment.positive_class is not None:
        raise ValueError("positive_class: a multiclass experiment has no positive class (drop it; see 'classes')")
    if experiment.classes is not None:
        if len(experiment.classes) < 3:
            raise ValueError(f"classes: a multiclass experiment needs at least 3, got {experiment.classes}")
        if len(set(experiment.classes)) != len(experiment.classes):
            raise ValueError(f"classes: each class once, got {experiment.classes}")
    if experiment.classifiers.scoring not in MULTICLASS_SCORINGS:
        raise ValueError(
            f"classifiers.scoring: {experiment.classifiers.scoring!r} is for binary tasks; "
            f"a multiclass experiment takes one of {list(MULTICLASS_SCORINGS)}"
        )
    if experiment.finetune.head == "ordinal" and not experiment.ordinal:
        raise ValueError("finetune.head: 'ordinal' needs 'ordinal: true' (ordered classes)")
    unsupported = {
        "evaluate.study_aggregation": experiment.evaluate.study_aggregation,
        "evaluate.calibration": experiment.evaluate.calibration,
        "evaluate.subgroups": experiment.evaluate.subgroups,
    }
    for key, value in unsupported.items():
        if value:
            raise ValueError(f"{key}: not available for multiclass experiments yet (binary only); remove it")


def load_experiment(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), data_root: str | Path | None = None
) -> Experiment:
    """Read, override and validate an experiment; data roots and weights files become absolute paths.

    Without `data_root`, relative data roots resolve against the experiment file's folder. With it, each source's
    root is looked up inside `data_root` (`find_data_root`). Relative weights files always resolve against the
    experiment file's folder.
    """
    path = Path(path)
    raw = read_mapping(path, "experiment")
    for text in overrides:
        apply_override(raw, text)
    return _resolve_paths(validate(Experiment, raw, path), path.parent.resolve(), data_root)


def _resolve_paths(experiment: Experiment, home: Path, data_root: str | Path | None) -> Experiment:
    several = len(experiment.data) > 1
    for index, spec in enumerate(experiment.data):
        key = f"data.{index}.root" if several else "data.root"
        if data_root is None:
            spec.root = str((home / spec.root).resolve())
            if not Path(spec.root).is_dir():
                raise InputError(
                    f"{key}: folder not found: {spec.root} (a relative root resolves against the experiment's "
                    f"folder; give the folder holding the data with --data-root DIR, or --set {key}=PATH)"
                )
        else:
            spec.root = str(find_data_root(spec, data_root, key, itself=not several))
    for entry in experiment.backbones:
        if entry.weights and entry.weights != "imagenet":
            entry.weights = str((home / entry.weights).resolve())
            if not Path(entry.weights).is_file():
                raise InputError(f"backbones.{entry.name}.weights: file not found: {entry.weights}")
    return experiment


def find_data_root(spec: DataSpec, data_root: str | Path, key: str = "data.root", itself: bool = True) -> Path:
    """The data set folder inside `data_root` for `spec.root`: the first that exists of `data_root` joined with the
    root's trailing folder names, longest first, then (`itself`: single-source experiments) `data_root` itself.

    `root: ../../shared/data/fracatlas` tries DIR/shared/data/fracatlas, DIR/data/fracatlas, DIR/fracatlas, DIR.
    For `csv` and `chestxray14` sources a candidate must also hold the labels file (`csv`).
    """
    base = Path(data_root).resolve()
    if not base.is_dir():
        raise InputError(f"--data-root {data_root}: folder not found")
    root = PurePath(spec.root)
    names = [part for part in root.parts[1 if root.anchor else 0 :] if part != ".."]
    candidates = [base.joinpath(*names[start:]) for start in range(len(names))] + ([base] if itself else [])
    needs = spec.csv if spec.format in ("csv", "chestxray14") else None
    for candidate in candidates:
        if candidate.is_dir() and (needs is None or (candidate / needs).is_file()):
            return candidate
    holding = f" holding {needs}" if needs else ""
    target = repr(names[-1]) if names else "the data"
    raise InputError(
        f"{key}: folder not found under --data-root {data_root}: no folder{holding} at "
        f"{', '.join(map(str, candidates))}; point --data-root at the folder that holds {target}"
        + (" or at that folder itself" if itself else "")
    )
