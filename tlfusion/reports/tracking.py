"""Run tracking: a finished run folder logged as one MLflow run (`tlfusion run --track mlflow`), and the table of
runs `tlfusion runs` prints, from run folders or from an MLflow store.

MLflow is optional (`pip install "tlfusion[tracking]"`). The store is `MLFLOW_TRACKING_URI` when set, else a local
`mlruns/` folder in the working directory (MLflow 3 keeps folder stores in maintenance mode and refuses them unless
`MLFLOW_ALLOW_FILE_STORE` is true: tlfusion sets it for a folder store unless it is set already).

A run logs: params, the resolved experiment config flattened to dotted keys (lists as JSON); metrics, every numeric
value of metrics.json's result, calibration and subgroup rows (keys like `test.image.fusion/lr.kappa`; an ordered
K-class row's cut points as `auroc_ge_<class>`),
`selected.<metric>` for the selected model's headline row, and `timing.<stage>` seconds; artifacts, the report
(report.html, report.md, plots/) under `report`, the review gallery under `gallery` and the bundle under `bundle`,
with metrics.json and timings.json.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tlfusion.errors import InputError
from tlfusion.evaluation.class_metrics import CLASS_METRICS
from tlfusion.evaluation.metrics import METRICS
from tlfusion.reports.reading import evaluation_split, format_metric, headline_level, is_number
from tlfusion.run.paths import RunPaths
from tlfusion.run.readers import read_json_object

DEFAULT_STORE = "mlruns"
HEADLINE = ("kappa", "auroc", "brier", "ece")
_BATCH = 100  # MLflow takes at most 100 params or 1000 metrics per request
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")


def require_mlflow():
    """The `mlflow` module, or InputError saying how to install it."""
    try:
        import mlflow
    except ImportError:
        raise InputError('--track mlflow: MLflow is not installed; pip install "tlfusion[tracking]"') from None
    return mlflow


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else the `mlruns/` folder in the working directory as a file URI."""
    return os.environ.get("MLFLOW_TRACKING_URI") or Path(DEFAULT_STORE).resolve().as_uri()


def _client():
    """An MLflow client of `tracking_uri()` (a folder store allowed, see the module)."""
    require_mlflow()
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(uri)


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys -> text (lists and other values as JSON)."""
    if not isinstance(config, Mapping):
        return {prefix: config if isinstance(config, str) else json.dumps(config, default=str)}
    flat: dict[str, str] = {}
    for key, value in config.items():
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _key(*parts: Any) -> str:
    """An MLflow metric name from parts (characters it refuses become `_`)."""
    return _UNSAFE.sub("_", ".".join(str(part) for part in parts))


def metric_values(metrics: Mapping) -> dict[str, float]:
    """metrics.json's numbers as MLflow metrics (see the module), undefined values left out."""
    values: dict[str, float] = {}
    for row in metrics.get("results", []):
        where = (row["split"], row.get("level") or row.get("finding"), row["model"])
        names = dict.fromkeys((*METRICS, *CLASS_METRICS))  # binary, multi-label and K-class rows' metrics
        values |= {_key(*where, metric): row[metric] for metric in names if is_number(row.get(metric))}
        cuts = row.get("cut_auroc", [])  # ordered K-class rows
        values |= {_key(*where, f"auroc_ge_{cut['cut']}"): cut["auroc"] for cut in cuts if is_number(cut["auroc"])}
    for row in (metrics.get("calibration") or {}).get("rows", []):
        where = ("calibration", row["split"], row["stage"], row["model"])
        values |= {_key(*where, name): row[name] for name in ("brier", "ece")}
    for row in metrics.get("subgroups", []):
        where = ("subgroup", row["column"], row["value"])
        values |= {_key(*where, name): row[name] for name in (*METRICS, "brier", "ece") if is_number(row.get(name))}
    values |= {_key("selected", name): value for name, value in headline(metrics).items() if is_number(value)}
    return {key: float(value) for key, value in values.items()}


def headline(metrics: Mapping) -> dict[str, Any]:
    """The selected model on the evaluated split: kappa and AUROC (multi-label: mean AUROC) of its headline level,
    Brier and ECE (recalibrated where it was)."""
    split, selected = evaluation_split(metrics), metrics.get("selected")
    level = headline_level(metrics, split)
    rows = [r for r in metrics.get("results", []) if r["model"] == selected and r["split"] == split]
    row = next((r for r in rows if r.get("level", "image") == level and r.get("finding") in (None, "mean")), {})
    calibration = [r for r in (metrics.get("calibration") or {}).get("rows", []) if r["model"] == selected]
    latest = calibration[-1] if calibration else {}
    return {
        "kappa": row.get("kappa"),
        "auroc": row.get("auroc"),
        "brier": latest.get("brier"),
        "ece": latest.get("ece"),
    }


def track_run(run_dir: str | Path, config: Mapping, name: str) -> str:
    """Log the finished run folder `run_dir` (experiment `config`) as an MLflow run in experiment `name`; its id."""
    client = _client()
    from mlflow.entities import Metric, Param

    paths = RunPaths(run_dir)
    metrics = read_json_object(paths.metrics) if paths.metrics.is_file() else {}
    timings = read_json_object(paths.timings) if paths.timings.is_file() else {}
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    tags = {"mlflow.runName": name, "tlfusion.run_folder": str(paths.root.resolve())}
    tags |= {"tlfusion.selected": str(metrics.get("selected", "")), "tlfusion.task": str(metrics.get("task", ""))}
    run = client.create_run(experiment_id, tags=tags)
    values = metric_values(metrics) | {_key("timing", stage): float(s) for stage, s in timings.items() if is_number(s)}
    params = [Param(key[:250], value[:6000]) for key, value in flatten(config).items()]
    points = [Metric(key, value, 0, 0) for key, value in values.items()]
    for start in range(0, max(len(params), len(points)), _BATCH):
        client.log_batch(run.info.run_id, metrics=points[start : start + _BATCH], params=params[start : start + _BATCH])
    for local, artifact in _artifacts(paths):
        log = client.log_artifacts if local.is_dir() else client.log_artifact
        log(run.info.run_id, str(local), artifact)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _artifacts(paths: RunPaths) -> Iterator[tuple[Path, str | None]]:
    """(file or folder in the run folder, MLflow artifact folder) of what a tracked run keeps."""
    root = paths.root
    candidates = [
        (paths.report, "report"),
        (RunPaths(root).report_md, "report"),
        (root / "plots", "report/plots"),
        (paths.explanations, "gallery"),
        (paths.bundle, "bundle"),
        (paths.metrics, None),
        (paths.timings, None),
    ]
    return ((path, artifact) for path, artifact in candidates if path.exists())


def folder_runs(folders: list[str]) -> list[dict[str, Any]]:
    """One row per run folder (a folder with metrics.json, given or directly inside a given one), newest first."""
    found = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise InputError(f"{folder}: no such folder")
        inside = [folder] if RunPaths(folder).metrics.is_file() else sorted(folder.iterdir())
        found += [run for run in inside if RunPaths(run).metrics.is_file()]
    rows = []
    for run in found:
        metrics = read_json_object(RunPaths(run).metrics)
        when = RunPaths(run).metrics.stat().st_mtime
        rows.append({"run": str(run), "experiment": metrics.get("experiment"), "selected": metrics.get("selected"),
                     "time": when, **headline(metrics)})  # fmt: skip
    return sorted(rows, key=lambda row: -row["time"])


def mlflow_runs(experiment: str | None) -> list[dict[str, Any]]:
    """One row per MLflow run in the store (of `experiment`, or of every experiment), newest first."""
    client = _client()
    experiments = client.search_experiments()
    ids = [e.experiment_id for e in experiments if experiment is None or e.name == experiment]
    if not ids:
        raise InputError(f"--experiment {experiment}: no such MLflow experiment in {tracking_uri()}")
    names = {e.experiment_id: e.name for e in experiments}
    return [
        {
            "run": run.info.run_id,
            "experiment": names[run.info.experiment_id],
            "selected": run.data.tags.get("tlfusion.selected"),
            "time": run.info.start_time / 1000,
            **{name: run.data.metrics.get(f"selected.{name}") for name in HEADLINE},
        }
        for run in client.search_runs(ids, order_by=["attributes.start_time DESC"])
    ]


def runs_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table: run, experiment, selected model, finished, headline numbers."""
    from datetime import datetime, timezone

    header = ["run", "experiment", "selected", "finished (UTC)", *HEADLINE]
    lines = [
        [str(row["run"]), str(row["experiment"]), str(row["selected"])]
        + [datetime.fromtimestamp(row["time"], timezone.utc).strftime("%Y-%m-%d %H:%M")]
        + [format_metric(row[name]) for name in HEADLINE]
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join(_aligned(cells, widths) for cells in [header, *lines])


def _aligned(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
