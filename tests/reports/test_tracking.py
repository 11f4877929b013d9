"""`tlfusion run --track mlflow` read back with the MLflow client, and `tlfusion runs`."""

from __future__ import annotations

import pytest

from tests.evaluation.test_subgroups import calibrated_experiment, write_csv_dataset
from tlfusion.cli import main
from tlfusion.reports.tracking import flatten, metric_values

mlflow = pytest.importorskip("mlflow")


def test_flatten_and_metric_names():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}
    subgroup = {"column": "view", "value": "frontal+lateral", "kappa": 0.5, "auroc": None, "brier": 0.1, "ece": 0.2}
    values = metric_values({"results": [], "subgroups": [subgroup], "selected": "m"})
    assert values == {"subgroup.view.frontal_lateral.kappa": 0.5, "subgroup.view.frontal_lateral.brier": 0.1,
                      "subgroup.view.frontal_lateral.ece": 0.2}  # fmt: skip
    cuts = [{"cut": "1", "positives": 9, "auroc": 0.7}, {"cut": "2", "positives": 4, "auroc": None}]
    row = {"model": "m", "level": "image", "split": "test", "accuracy": 0.5, "cut_auroc": cuts}
    assert metric_values({"results": [row]}) == {"test.image.m.accuracy": 0.5, "test.image.m.auroc_ge_1": 0.7}


def test_a_tracked_run_is_read_back_with_its_params_metrics_and_artifacts(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # tlfusion opts in for a folder store
    experiment = calibrated_experiment(tmp_path, write_csv_dataset(tmp_path / "csv"))
    runs = tmp_path / "runs"
    assert main(["run", str(experiment), "--out", str(runs / "calibrated"), "--track", "mlflow"]) == 0

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("calibrated").experiment_id])
    assert run.data.params["evaluate.calibration"] == "sigmoid"
    assert run.data.params["evaluate.subgroups"] == '["view", "hardware"]'
    selected = run.data.tags["tlfusion.selected"]
    assert f"test.image.{selected}.kappa" in run.data.metrics and "selected.ece" in run.data.metrics
    assert run.data.metrics["timing.fit"] > 0 and run.info.status == "FINISHED"
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"report", "bundle", "metrics.json", "timings.json"} <= artifacts
    assert "report/report.html" in {item.path for item in client.list_artifacts(run.info.run_id, "report")}

    capsys.readouterr()
    assert main(["runs", "--mlflow"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split()[:3] == ["run", "experiment", "selected"] and run.info.run_id in listed[1]
    assert main(["runs", str(runs)]) == 0
    assert str(runs / "calibrated") in capsys.readouterr().out


def test_runs_names_a_missing_folder(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
