"""MURA study-level evaluation through the whole pipeline: the shipped experiment, shrunk, on a MURA-shaped tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tlfusion.cli import main
from tlfusion.evaluation import metrics as metrics_module
from tlfusion.evaluation.metrics import binary_metrics
from tlfusion.evaluation.schema import validate_metrics

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "mura_humerus.yaml"
SMALL = [
    "image.size=32",
    "backbones=[{name: mobilenetv2, options: {alpha: 0.35}}]",
    "finetune.enabled=false",  # fine-tuning has its own tests; here it would triple the run time
    "features.engine=keras",
    "classifiers.models=[lr, knn]",
    "classifiers.cv=3",
    "evaluate.bootstrap=20",
    "explain.enabled=false",
]


@pytest.fixture
def mura_run(tmp_path, mura_tree, monkeypatch) -> tuple[Path, list]:
    """The run folder and every (study ids, labels, probabilities) the study aggregation returned during it."""
    aggregated, aggregate = [], metrics_module.aggregate_by_study

    def recording(*args, **kwargs):
        aggregated.append(aggregate(*args, **kwargs))
        return aggregated[-1]

    monkeypatch.setattr(metrics_module, "aggregate_by_study", recording)
    run = tmp_path / "run"
    overrides = [part for setting in SMALL for part in ("--set", setting)]
    assert main(["run", str(EXPERIMENT), "--data-root", str(mura_tree.parent), "--out", str(run), *overrides]) == 0
    return run, aggregated


def test_study_level_rows_are_the_mean_of_their_images(mura_run):
    run, aggregated = mura_run
    metrics = json.loads((run / "metrics.json").read_text())
    validate_metrics(metrics)
    table = pd.read_csv(run / "data" / "table.csv", dtype={"patient": str, "study": str})
    predictions = pd.read_csv(run / "fit" / "predictions.csv", dtype={"patient": str, "study": str})
    test_studies = table.loc[table["split"] == "test", "study"].nunique()
    assert test_studies == 12  # valid/XR_HUMERUS: 6 patients with 2 studies of 2 images each

    study_rows = [row for row in metrics["results"] if (row["level"], row["split"]) == ("study", "test")]
    assert {row["model"] for row in study_rows} == {"mobilenetv2/lr", "mobilenetv2/knn"}
    mean_differs_from_max = []
    for row in study_rows:
        images = predictions[(predictions["model"] == row["model"]) & (predictions["split"] == "test")]
        studies = images.groupby("study").agg(y=("y_true", "first"), prob=("prob", "mean"), peak=("prob", "max"))
        mean_differs_from_max.append(bool((studies["prob"] != studies["peak"]).any()))
        assert any(
            list(ids) == list(studies.index) and np.allclose(prob, studies["prob"], rtol=0, atol=1e-12)
            for ids, _, prob in aggregated
        ), f"{row['model']}: no study probabilities equal to the mean of their images"
        expected = binary_metrics(studies["y"], studies["prob"], row["threshold"])
        assert row["n"] == expected["n"] == test_studies
        assert row["confusion"] == expected["confusion"]
        for key in ("accuracy", "kappa", "auroc", "sensitivity", "specificity"):
            assert row[key] == pytest.approx(expected[key], abs=1e-12), (row["model"], key)
        assert set(row["ci"]) >= {"kappa", "auroc"}
    assert any(mean_differs_from_max)  # for at least one model, max aggregation would have failed this test
    image_rows = [row for row in metrics["results"] if (row["level"], row["split"]) == ("image", "test")]
    assert {row["n"] for row in image_rows} == {2 * test_studies}
