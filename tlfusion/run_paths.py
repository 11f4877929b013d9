"""The run-folder contract: every file a run writes, named once, grouped by the stage that writes it.

The pipeline, the bundle commands and the benchmarks reach a run's files only through `RunPaths`; the stage
registry (`tlfusion.stages.REGISTRY`) names each stage's inputs and outputs by these attribute names, and
docs/architecture.md lists them.
"""

from __future__ import annotations

from pathlib import Path


class RunPaths:
    """The paths inside run folder `root`."""

    def __init__(self, root: str | Path):
        self.root = root = Path(root)
        # the runner
        self.state = root / ".stages.json"  # stage -> cache key of its last completed run
        self.timings = root / "timings.json"  # stage -> seconds of its last run
        self.log = root / "run.log"
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
        self.bundle = root / "bundle"  # the selected model (tlfusion.bundle)
        # evaluate or semantic; explain; report; fewshot
        self.metrics = root / "metrics.json"  # tlfusion.metrics_schema
        self.explanations = root / "explanations"
        self.gallery = self.explanations / "index.html"
        self.report = root / "report.html"  # beside report.md and plots/
        self.fewshot = root / "fewshot.json"
        self.fewshot_curve = root / "fewshot_curve.json"
        self.fewshot_plot = root / "plots" / "fewshot_auroc_vs_shots.png"

    def model(self, key: str) -> Path:
        """Backbone `key`, fine-tuned (or as configured) by the finetune stage."""
        return self.root / "backbones" / key / "model.keras"

    def features(self, key: str) -> Path:
        """Backbone `key`'s features, one row per table row, written by the extract stage."""
        return self.root / "features" / f"{key}.npy"

    def __repr__(self) -> str:
        return f"RunPaths({str(self.root)!r})"
