"""The stage registry: each stage's function, the config sections and code its cache key covers, and the run-folder
files (`RunPaths` names) it reads and writes.

Binary task:     data -> finetune -> extract -> fit (+ bundle) -> evaluate -> explain -> report
Multi-class:     the same stages; fit, evaluate and explain run the K-class functions (`stages.multiclass`)
Few-shot task:   data -> extract -> fewshot
Multi-label:     data -> finetune -> extract -> semantic -> explain_findings -> report
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tlfusion.metrics_schema import read_metrics
from tlfusion.stages.binary import run_evaluate, run_explain, run_fit
from tlfusion.stages.context import RunContext
from tlfusion.stages.multiclass import run_class_evaluate, run_class_explain, run_class_fit
from tlfusion.stages.prepare import check_models, run_data, run_extract, run_finetune
from tlfusion.stages.report import run_report
from tlfusion.stages.tasks import run_explain_findings, run_fewshot_stage, run_semantic


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunContext], None]
    sections: tuple[str, ...]
    """Experiment config sections in its cache key (or one key of a section: `evaluate.calibration`)."""
    modules: tuple[str, ...]
    """tlfusion modules whose code is in its cache key (with what they import at module level: `stage_code`)."""
    reads: tuple[str, ...]
    """`RunPaths` names it reads (besides the experiment's images)."""
    writes: tuple[str, ...]
    """`RunPaths` names it writes."""
    check: Callable[[RunContext], object] | None = None
    """Reads back the outputs later stages use (InputError if damaged): run before skipping the stage."""


def _by_task(binary: Callable[[RunContext], None], multiclass: Callable[[RunContext], None]):
    """A stage function that runs `multiclass` for a multiclass experiment and `binary` otherwise."""

    def run(context: RunContext) -> None:
        (multiclass if context.experiment.task == "multiclass" else binary)(context)

    run.__doc__ = f"{binary.__doc__}\n\nMulticlass: {multiclass.__doc__}"
    return run


def _check_features(run: RunContext) -> None:
    run.load_features(run.backbone_keys)


def _check_metrics(run: RunContext) -> None:
    read_metrics(run.paths.metrics)


_PREPARE = "tlfusion.stages.prepare"
_BINARY = "tlfusion.stages.binary"
_MULTICLASS = "tlfusion.stages.multiclass"
_TASKS = "tlfusion.stages.tasks"
REGISTRY: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "data",
            run_data,
            ("task", "seed", "data", "positive_class", "classes", "split"),
            (_PREPARE, "tlfusion.data.sources", "tlfusion.data.splits", "tlfusion.data.images"),
            reads=("scan_cache",),
            writes=("table", "data_summary", "scan_cache", "skipped"),
        ),
        Stage(
            "finetune",
            run_finetune,
            ("image", "backbones", "finetune"),
            (_PREPARE, "tlfusion.training", "tlfusion.multilabel_training", "tlfusion.backbones"),
            reads=("table",),
            writes=("model",),
            check=check_models,
        ),
        Stage(
            "extract",
            run_extract,
            ("features",),
            (_PREPARE, "tlfusion.features", "tlfusion.backbones"),
            reads=("table", "model", "cache"),
            writes=("features", "cache"),
            check=_check_features,
        ),
        Stage(
            "fit",
            _by_task(run_fit, run_class_fit),
            ("classifiers", "evaluate.calibration"),
            (
                _BINARY,
                _MULTICLASS,
                "tlfusion.classifiers",
                "tlfusion.features",
                "tlfusion.bundle",
                "tlfusion.calibration",
            ),
            reads=("table", "features", "model", "cache"),
            writes=("selection", "predictions", "bundle"),
            check=RunContext.fit_outputs,
        ),
        Stage(
            "evaluate",
            _by_task(run_evaluate, run_class_evaluate),
            ("evaluate", "ordinal"),
            (
                _BINARY,
                _MULTICLASS,
                "tlfusion.metrics",
                "tlfusion.class_metrics",
                "tlfusion.reports",
                "tlfusion.data.sources",
                "tlfusion.subgroups",
            ),
            reads=("table", "selection", "predictions"),
            writes=("metrics",),
            check=_check_metrics,
        ),
        Stage(
            "explain",
            _by_task(run_explain, run_class_explain),
            ("explain",),
            (_BINARY, _MULTICLASS, "tlfusion.explain", "tlfusion.explain.classes", "tlfusion.bundle"),
            reads=("table", "features", "selection", "predictions", "bundle"),
            writes=("explanations",),
        ),
        Stage(
            "report",
            run_report,
            (),
            ("tlfusion.stages.report", "tlfusion.reports"),
            reads=("metrics", "selection", "predictions", "timings", "gallery"),
            writes=("report",),
        ),
        Stage(
            "fewshot",
            run_fewshot_stage,
            ("fewshot", "evaluate.subgroups"),
            (_TASKS, "tlfusion.fewshot", "tlfusion.features"),
            reads=("table", "features"),
            writes=("fewshot", "fewshot_curve", "fewshot_plot"),
        ),
        Stage(
            "semantic",
            run_semantic,
            ("semantic",),
            (_TASKS, "tlfusion.semantic", "tlfusion.semantic_eval", "tlfusion.label_embeddings", "tlfusion.metrics"),
            reads=("table", "features", "model"),
            writes=("metrics", "semantic_scores"),
            check=_check_metrics,
        ),
        Stage(
            "explain_findings",
            run_explain_findings,
            ("explain",),
            (_TASKS, "tlfusion.explain.findings", "tlfusion.backbones"),
            reads=("table", "model", "metrics", "semantic_scores"),
            writes=("explanations",),
        ),
    )
}
TASKS: dict[str, tuple[str, ...]] = {
    "binary": ("data", "finetune", "extract", "fit", "evaluate", "explain", "report"),
    "multiclass": ("data", "finetune", "extract", "fit", "evaluate", "explain", "report"),
    "fewshot": ("data", "extract", "fewshot"),
    "multilabel": ("data", "finetune", "extract", "semantic", "explain_findings", "report"),
}
"""Task -> its stages, in order."""
