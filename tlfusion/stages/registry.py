"""The stage registry: each stage's function, the config sections and code its cache key covers, and the run-folder
files (`RunPaths` names) it reads and writes.

Binary task:     data -> finetune -> extract -> fit (+ bundle) -> evaluate -> explain -> report
Multi-class:     the same stages; fit, evaluate and explain run the K-class functions (`fit_multiclass`, ...)
Few-shot task:   data -> extract -> fewshot
Multi-label:     data -> finetune -> extract -> semantic -> explain_findings -> report
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tlfusion.evaluation.schema import read_metrics
from tlfusion.stages.context import RunContext
from tlfusion.stages.data import run_data
from tlfusion.stages.evaluate import run_evaluate
from tlfusion.stages.explain import run_explain
from tlfusion.stages.extract import run_extract
from tlfusion.stages.fewshot import run_fewshot_stage
from tlfusion.stages.findings import run_explain_findings
from tlfusion.stages.finetune import check_models, run_finetune
from tlfusion.stages.fit import run_fit
from tlfusion.stages.report import run_report
from tlfusion.stages.semantic import run_semantic


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunContext], None]
    sections: tuple[str, ...]
    """Experiment config sections in its cache key (or one key of a section: `evaluate.calibration`)."""
    reads: tuple[str, ...]
    """`RunPaths` names it reads (besides the experiment's images)."""
    writes: tuple[str, ...]
    """`RunPaths` names it writes."""
    check: Callable[[RunContext], object] | None = None
    """Reads back the outputs later stages use (InputError if damaged): run before skipping the stage."""

    @property
    def module(self) -> str:
        """The stage's own file (`run`'s module): its code key covers it and what it imports (`run.code_keys`)."""
        return self.run.__module__


def check_features(run: RunContext) -> None:
    """The backbones' feature files load."""
    run.load_features(run.backbone_keys)


def check_metrics(run: RunContext) -> None:
    """metrics.json reads back."""
    read_metrics(run.paths.metrics)


_TABLE = "table"
# fmt: off
REGISTRY: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("data", run_data, ("task", "seed", "data", "positive_class", "classes", "split"),
          reads=("scan_cache",), writes=(_TABLE, "data_summary", "scan_cache", "skipped")),
    Stage("finetune", run_finetune, ("image", "backbones", "finetune"),
          reads=(_TABLE,), writes=("model",), check=check_models),
    Stage("extract", run_extract, ("features",), reads=(_TABLE, "model", "cache"), writes=("features", "cache"),
          check=check_features),
    Stage("fit", run_fit, ("classifiers", "evaluate.calibration"), reads=(_TABLE, "features", "model", "cache"),
          writes=("selection", "predictions", "bundle"), check=RunContext.fit_outputs),
    Stage("evaluate", run_evaluate, ("evaluate", "ordinal"), reads=(_TABLE, "selection", "predictions"),
          writes=("metrics",), check=check_metrics),
    Stage("explain", run_explain, ("explain",), reads=(_TABLE, "features", "selection", "predictions", "bundle"),
          writes=("explanations",)),
    Stage("report", run_report, (), reads=("metrics", "selection", "predictions", "timings", "gallery"),
          writes=("report",)),
    Stage("fewshot", run_fewshot_stage, ("fewshot", "evaluate.subgroups"), reads=(_TABLE, "features"),
          writes=("fewshot", "fewshot_curve", "fewshot_plot")),
    Stage("semantic", run_semantic, ("semantic",), reads=(_TABLE, "features", "model"),
          writes=("metrics", "semantic_scores"), check=check_metrics),
    Stage("explain_findings", run_explain_findings, ("explain",), reads=(_TABLE, "model", "metrics", "semantic_scores"),
          writes=("explanations",)),
)}
# fmt: on
TASKS: dict[str, tuple[str, ...]] = {
    "binary": ("data", "finetune", "extract", "fit", "evaluate", "explain", "report"),
    "multiclass": ("data", "finetune", "extract", "fit", "evaluate", "explain", "report"),
    "fewshot": ("data", "extract", "fewshot"),
    "multilabel": ("data", "finetune", "extract", "semantic", "explain_findings", "report"),
}
"""Task -> its stages, in order."""
