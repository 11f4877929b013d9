"""The run-folder contract: every file a run writes, named once, grouped by the stage that writes it.

The pipeline, the bundle commands and the benchmarks reach a run's files only through `RunPaths` (an
explanations folder's files: `GALLERY`, `REVIEW`); the stage
registry (`tlfusion.stages.registry.REGISTRY`) names each stage's inputs and outputs by these attribute names, and
docs/architecture.md lists them.
"""

from __future__ import annotations

from pathlib import Path

METRICS = "metrics.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FEWSHOT = "fewshot.json"
FEWSHOT_CURVE = "fewshot_curve.json"
RUN_LOG = "run.log"
GALLERY = "index.html"
"""An explanations folder's review page (the run's `explanations/`, or `tlfusion explain --out`)."""
REVIEW = "review.csv"
"""An explanations folder's table of the reviewed cases."""
PLOTS = "plots"


class RunPaths:
    """The paths inside run folder `root`."""

    def __init__(self, root: str | Path):
        self.root = root = Path(root)
        # the runner
        self.state = root / ".stages.json"  # stage -> cache key of its last completed run
        self.timings = root / "timings.json"  # stage -> seconds of its last run
        self.log = root / RUN_LOG
        # data
        self.table = root / "data" / "table.csv"  # one row per image: path, label(s), patient, study, sha256, split
        self.data_summary = root / "data" / "summary.json"
        self.scan_cache = root / "data" / "scan.json"  # file stamp -> sha256
        self.skipped = root / "data" / "skipped.json"  # unreadable images left out (--skip-bad)
        # extract (features per backbone: `features(key)`; fine-tuned backbones: `model(key)`)
        self.cache = root / "cache"  # feature and ONNX caches keyed by model and image content
        # fit
        self.selection = root / "fit" / "selection.json"  # selected model, scoring, CV scores, thresholds
        self.predictions = root / "fit" / "predictions.csv"  # out-of-fold (cv) and test probabilities per model
        self.semantic_scores = root / "fit" / "semantic_scores.csv"  # multi-label: test probabilities per loss
        self.bundle = root / "bundle"  # the selected model (tlfusion.bundle.folder)
        # evaluate or semantic; explain; report; fewshot
        self.metrics = root / METRICS  # tlfusion.evaluation.schema
        self.explanations = root / "explanations"
        self.gallery = self.explanations / GALLERY
        self.review = self.explanations / REVIEW
        self.report = root / REPORT_HTML  # beside report.md and plots/
        self.report_md = root / REPORT_MD
        self.plots = root / PLOTS
        self.fewshot = root / FEWSHOT
        self.fewshot_curve = root / FEWSHOT_CURVE
        self.fewshot_plot = self.plots / "fewshot_auroc_vs_shots.png"

    def model(self, key: str) -> Path:
        """Backbone `key`, fine-tuned (or as configured) by the finetune stage."""
        return self.root / "backbones" / key / "model.keras"

    def features(self, key: str) -> Path:
        """Backbone `key`'s features, one row per table row, written by the extract stage."""
        return self.root / "features" / f"{key}.npy"

    def __repr__(self) -> str:
        return f"RunPaths({str(self.root)!r})"
