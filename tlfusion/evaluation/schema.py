"""The `metrics.json` schema and its one writer and reader.

Binary runs (and `tlfusion evaluate`), multi-class and multi-label runs write different documents, told apart by
`task`.
`write_metrics` validates before writing, so a document that does not match is a bug, raised as ValueError (exit 1);
`read_metrics` refuses a damaged file on disk with InputError naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from tlfusion.errors import InputError
from tlfusion.fileio import write_json
from tlfusion.run.readers import read_json_object

Interval = list[float] | None
"""A percentile interval [low, high]; None where undefined in every resample."""


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BinaryResult(_Schema):
    """One model on one split at one level: metrics at its threshold and (test split) bootstrap intervals."""

    model: str
    level: Literal["image", "study"]
    split: str
    """"cv" (out-of-fold on the training split), "test", or the split `tlfusion evaluate` was given."""
    n: int
    accuracy: float | None
    f1: float | None
    kappa: float | None
    auroc: float | None
    sensitivity: float | None
    specificity: float | None
    confusion: list[list[int]]
    threshold: float
    ci: dict[str, Interval]
    """Metric -> interval; empty without a bootstrap."""


class Delta(_Schema):
    delta: float | None
    ci: Interval


class FusionVsSingle(_Schema):
    """Fusion minus one single backbone with the same classifier, test split, paired bootstrap."""

    level: Literal["image", "study"]
    classifier: str
    fusion: str
    single: str
    kappa: Delta
    auroc: Delta


class SelectionRecord(_Schema):
    scoring: str
    cv: int
    cv_scores: dict[str, float | None]


class SubgroupResult(BinaryResult):
    """The selected model on one subgroup (rows whose data-table `column` is `value`) of the evaluated split, at its
    threshold, with Brier and ECE; `warning` when the subgroup is too small (`tlfusion.evaluation.subgroups`)."""

    column: str
    value: str
    positives: int
    brier: float
    ece: float
    warning: str | None = None


class ReliabilityBin(_Schema):
    low: float
    high: float
    n: int
    mean_prob: float
    observed: float


class CalibrationRow(_Schema):
    """One model's calibration on one split: as predicted ("before") or recalibrated ("after")."""

    model: str
    split: str
    stage: Literal["before", "after"]
    n: int
    brier: float
    ece: float
    ci: dict[str, Interval]
    bins: list[ReliabilityBin]
    threshold: float | None = None
    """The recalibrated model's threshold, chosen on its recalibrated out-of-fold probabilities."""


class CalibrationRecord(_Schema):
    method: Literal["sigmoid", "isotonic"] | None
    binning: str
    rows: list[CalibrationRow]


class _SelectedModelMetrics(_Schema):
    """What a binary and a K-class metrics.json share: the selected model, how it was chosen, the data."""

    experiment: str
    selected: str
    selection: SelectionRecord | None = None
    """How `selected` was chosen; absent for a bundle evaluated by `tlfusion evaluate`."""
    data: dict | None = None
    """`data.sources.summarise` of the run's table."""
    test_images_seen_in_pretraining: dict[str, int] = Field(default_factory=dict)


class BinaryMetrics(_SelectedModelMetrics):
    task: Literal["binary"]
    positive_class: str
    results: list[BinaryResult]
    fusion_vs_single: list[FusionVsSingle] = Field(default_factory=list)
    calibration: CalibrationRecord | None = None
    subgroups: list[SubgroupResult] = Field(default_factory=list)


class FindingResult(_Schema):
    """One loss's test AUROC on one finding, or on their mean (`finding` "mean", with `n` and a CI)."""

    model: str
    finding: str
    split: str
    auroc: float | None
    n: int | None = None
    positives: int | None = None
    """Test images with the finding (the mean's row: with any finding)."""
    ci: dict[str, Interval] | None = None


class MultilabelMetrics(_Schema):
    experiment: str
    task: Literal["multilabel"]
    selected: str
    val_mean_auroc: dict[str, float | None]
    findings: list[str]
    seen: list[str]
    unseen: list[str]
    results: list[FindingResult]
    gzsl: dict[str, dict[str, float | None]]
    gzsl_ci: dict[str, dict[str, Interval]] = Field(default_factory=dict)
    """Loss -> patient-bootstrap intervals of its GZSL seen / unseen / h."""
    vs_bce: dict[str, Delta] = Field(default_factory=dict)
    """Loss -> its test mean AUROC minus BCE's, with a paired patient-bootstrap interval."""
    finetune: dict[str, dict] = Field(default_factory=dict)
    """Backbone -> the multi-label fine-tuning loss chosen on validation (`loss_choice.json`)."""
    data: dict


class PerClassResult(_Schema):
    """One class against the rest: its number of images and metrics, and (evaluated split) their intervals."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(alias="class")
    n: int
    sensitivity: float | None
    specificity: float | None
    f1: float | None
    auroc: float | None
    ci: dict[str, Interval] = Field(default_factory=dict)


class CutAuroc(_Schema):
    """Ordered classes: grade >= `cut` against the rest, scored by P(grade >= cut); (evaluated split) its interval."""

    cut: str
    positives: int
    auroc: float | None
    ci: Interval = None


class ClassResult(_Schema):
    """One K-class model on one split (image level): metrics of its most probable class, the confusion matrix
    (rows true, columns predicted, in `classes` order), per-class rows and (test split) bootstrap intervals."""

    model: str
    level: Literal["image"]
    split: str
    n: int
    accuracy: float | None
    balanced_accuracy: float | None
    macro_f1: float | None
    kappa: float | None
    quadratic_kappa: float | None
    macro_auroc: float | None
    confusion: list[list[int]]
    per_class: list[PerClassResult]
    ci: dict[str, Interval]
    cut_auroc: list[CutAuroc] = Field(default_factory=list)
    """Ordered classes only: one entry per cut point (every class but the first)."""


class ClassFusionVsSingle(_Schema):
    """Fusion minus one single backbone with the same classifier, test split, paired bootstrap."""

    level: Literal["image"]
    classifier: str
    fusion: str
    single: str
    accuracy: Delta
    balanced_accuracy: Delta
    macro_f1: Delta
    kappa: Delta
    quadratic_kappa: Delta
    macro_auroc: Delta


class MulticlassMetrics(_SelectedModelMetrics):
    task: Literal["multiclass"]
    classes: list[str]
    ordinal: bool
    results: list[ClassResult]
    fusion_vs_single: list[ClassFusionVsSingle] = Field(default_factory=list)


Metrics = Annotated[BinaryMetrics | MulticlassMetrics | MultilabelMetrics, Field(discriminator="task")]
_ADAPTER = TypeAdapter(Metrics)


def validate_metrics(metrics: dict) -> BinaryMetrics | MulticlassMetrics | MultilabelMetrics:
    """The document as its schema type (ValidationError, a ValueError, when it does not match)."""
    return _ADAPTER.validate_python(metrics)


def write_metrics(path: str | Path, metrics: dict) -> Path:
    """Validate `metrics` against the schema, then write it atomically."""
    validate_metrics(metrics)
    return write_json(path, metrics)


def read_metrics(path: Path) -> dict:
    """A metrics.json that matches the schema, or InputError naming the file."""
    metrics = read_json_object(path)
    try:
        validate_metrics(metrics)
    except ValidationError as error:
        raise InputError(f"{path}: does not match the metrics.json schema ({error.error_count()} error(s))") from None
    return metrics
