"""The demo's experiment on the shipped sample, shrunk: tlfusion/demo (package data) through the whole pipeline.

`tlfusion demo` takes no settings (it runs demo.yaml as shipped, a few minutes on CPU), so this runs the same
experiment file through `tlfusion run` with `--set` overrides that keep its data, backbones and ImageNet weights
but shrink the work (32 px, no fine-tuning, one classifier, no explanations: those have their own tests). It fails
when demo.yaml no longer loads or points elsewhere, when a sample file or label is missing or duplicated, or
when the run's numbers do not follow from its own predictions and bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tlfusion import load_bundle
from tlfusion.cli import DEMO_EXPERIMENT, main

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tlfusion" / "demo" / "sample"
SMALL = [
    "image.size=32",
    "finetune.enabled=false",
    "features.engine=keras",
    "classifiers.models=[lr]",
    "classifiers.cv=2",
    "classifiers.single_backbones=false",
    "evaluate.bootstrap=20",
    "explain.enabled=false",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("demo") / "run"
    overrides = [part for setting in SMALL for part in ("--set", setting)]
    assert main(["run", str(DEMO_EXPERIMENT), "--out", str(run), *overrides]) == 0
    return run


def test_demo_reads_every_kermany_image_of_the_shipped_sample(demo_run):
    assert DEMO_EXPERIMENT == REPO / "tlfusion" / "demo" / "demo.yaml"
    labels = pd.read_csv(SAMPLE / "labels.csv")
    expected = labels[labels["source"] == "kermany"]
    table = pd.read_csv(demo_run / "data" / "table.csv", dtype={"patient": str})
    assert sorted(table["path"]) == sorted(str(SAMPLE / path) for path in expected["path"])
    assert dict(zip(table["path"], table["label"], strict=True)) == {
        str(SAMPLE / path): label for path, label in zip(expected["path"], expected["label"], strict=True)
    }
    assert table["sha256"].is_unique  # no file of the sample is a copy of another
    splits = table.groupby("split")["patient"].apply(set)
    assert set(splits.index) == {"train", "val", "test"}
    assert not (splits["train"] & splits["test"] or splits["val"] & splits["test"] or splits["train"] & splits["val"])


def test_demo_metrics_follow_from_its_predictions_and_bundle(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    selected = metrics["selected"]
    assert selected == "fusion/lr"  # the demo's two ImageNet backbones, fused
    table = pd.read_csv(demo_run / "data" / "table.csv")
    predictions = pd.read_csv(demo_run / "fit" / "predictions.csv")
    test = predictions[(predictions["model"] == selected) & (predictions["split"] == "test")]
    assert sorted(test["path"]) == sorted(table.loc[table["split"] == "test", "path"])
    row = next(r for r in metrics["results"] if (r["model"], r["split"], r["level"]) == (selected, "test", "image"))
    assert row["n"] == len(test)
    assert row["auroc"] == pytest.approx(roc_auc_score(test["y_true"], test["prob"]), abs=1e-12)
    bundle = load_bundle(demo_run / "bundle")
    np.testing.assert_allclose(bundle.predict_proba(list(test["path"]))[:, 1], test["prob"], rtol=0, atol=1e-5)
    assert selected in (demo_run / "report.html").read_text()
