"""Multi-class (K >= 3, ordinal) tasks end to end: a tiny 3-grade CSV data set through every stage (fine-tuning with
the ordinal head, fit, evaluate, bundle round trip, predict CSV, the Python API, `tlfusion evaluate`, explain),
K-class metrics against scikit-learn on fixed predictions, and the configuration and reader errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn import metrics as sk

import tlfusion
from tests.conftest import write_png, xray_like
from tlfusion.bundle.folder import load_bundle
from tlfusion.cli import main
from tlfusion.errors import InputError
from tlfusion.evaluation.class_metrics import (
    class_bootstrap_ci,
    class_metrics,
    cut_auroc_ci,
    cut_aurocs,
    paired_class_delta,
)
from tlfusion.explain.cases import explain_cases

SIZE = 64  # the last convolution is 2x2
GRADES = ("0", "1", "2")
MODEL = "mobilenetv2/lr"


def write_graded_csv(root: Path, per_grade: int = 12) -> Path:
    """`root/labels.csv` (path, grade, patient: two images per patient) and its PNGs; grade g has a bright disc of
    radius growing with g (grade 0: none)."""
    rows = []
    for grade in range(len(GRADES)):
        for i in range(per_grade):
            pixels = xray_like(100 * grade + i, SIZE)
            if grade:
                pixels[8 : 8 + 8 * grade, 8 : 8 + 8 * grade] = 250
            path = write_png(root / "images" / f"g{grade}_{i}.png", pixels)
            rows.append((path.relative_to(root).as_posix(), GRADES[grade], f"p{grade}_{i // 2}"))
    pd.DataFrame(rows, columns=["path", "grade", "patient"]).to_csv(root / "labels.csv", index=False)
    return root


def experiment(root: Path, **changes) -> dict:
    base = {
        "name": "tiny_grades",
        "task": "multiclass",
        "ordinal": True,
        "data": {
            "format": "csv",
            "root": str(root),
            "csv": "labels.csv",
            "label_column": "grade",
            "patient_column": "patient",
        },
        "split": {"test_fraction": 0.25, "val_fraction": 0.25},
        "image": {"size": SIZE},
        "backbones": [{"name": "mobilenetv2", "options": {"alpha": 0.35}}],
        "finetune": {"warmup_epochs": 0, "epochs": 1, "batch_size": 8, "head": "ordinal"},
        "features": {"engine": "keras"},
        "classifiers": {"models": ["lr", "xgb"], "cv": 2},
        "evaluate": {"bootstrap": 30},
        "explain": {"cases": 3, "lime_samples": 20},
    }
    return base | changes


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> Path:
    return write_graded_csv(tmp_path_factory.mktemp("grades") / "data")


@pytest.fixture(scope="module")
def run(graded) -> Path:
    """A finished ordinal run (ordinal fine-tuning head, lr + xgb on one backbone) with 3 explained test cases."""
    folder = graded.parent
    (folder / "grades.yaml").write_text(yaml.safe_dump(experiment(graded)))
    assert main(["run", str(folder / "grades.yaml"), "--out", str(folder / "run")]) == 0
    return folder / "run"


def test_run_records_k_class_metrics_that_follow_from_its_predictions(run):
    """metrics.json's test rows are scikit-learn's metrics of fit/predictions.csv's most probable class, selected by
    CV quadratic kappa (the ordinal default), with patient-bootstrap intervals per metric and per class."""
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "multiclass" and metrics["classes"] == list(GRADES) and metrics["ordinal"] is True
    assert metrics["selection"]["scoring"] == "quadratic_kappa"
    cv = metrics["selection"]["cv_scores"]
    assert metrics["selected"] == max(cv, key=cv.get)
    predictions = pd.read_csv(run / "fit" / "predictions.csv")
    assert {"prob_0", "prob_1", "prob_2"} <= set(predictions.columns) and "prob" not in predictions.columns
    for row in (r for r in metrics["results"] if r["split"] == "test"):
        rows = predictions[(predictions["model"] == row["model"]) & (predictions["split"] == "test")]
        y, P = rows["y_true"].to_numpy(), rows[["prob_0", "prob_1", "prob_2"]].to_numpy()
        pred = P.argmax(axis=1)
        assert row["n"] == len(rows)
        assert row["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
        assert row["quadratic_kappa"] == pytest.approx(sk.cohen_kappa_score(y, pred, weights="quadratic"))
        assert row["confusion"] == sk.confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
        assert row["macro_auroc"] == pytest.approx(sk.roc_auc_score(y, P, multi_class="ovr"))
        assert row["ci"]["accuracy"][0] <= row["accuracy"] <= row["ci"]["accuracy"][1]
        assert all(entry["ci"] for entry in row["per_class"])
        for k, entry in enumerate(row["cut_auroc"], start=1):
            assert entry["cut"] == GRADES[k] and entry["positives"] == int((y >= k).sum())
            assert entry["auroc"] == pytest.approx(sk.roc_auc_score(y >= k, P[:, k:].sum(axis=1)))
            assert entry["ci"][0] <= entry["auroc"] <= entry["ci"][1]
    assert all(len(r["cut_auroc"]) == len(GRADES) - 1 for r in metrics["results"] if r["split"] == "cv")
    train = json.loads((run / "backbones" / "mobilenetv2" / "train.json").read_text())
    assert train["task"] == "ordinal" and train["settings"]["head"] == "ordinal" and train["outputs"] == ["1", "2"]
    report = (run / "report.md").read_text()
    assert "Confusion matrix" in report and "quadratic kappa" in report and "Per cut point" in report
    assert (run / "plots" / "confusion.png").is_file() and (run / "plots" / "roc_per_class.png").is_file()


def test_bundle_round_trip_predict_csv_and_api_give_the_runs_probabilities(run, graded, tmp_path):
    """The saved K-class bundle (task multiclass, no threshold) predicts what the fit stage stored for the selected
    model; `tlfusion predict` writes prob_<class> per class and the most probable class; the API says the same."""
    info = json.loads((run / "bundle" / "bundle.json").read_text())
    assert info["task"] == "multiclass" and info["threshold"] is None and info["class_names"] == list(GRADES)
    selected = json.loads((run / "metrics.json").read_text())["selected"]
    stored = pd.read_csv(run / "fit" / "predictions.csv")
    stored = stored[(stored["model"] == selected) & (stored["split"] == "test")]
    out = tmp_path / "predicted.csv"
    assert main(["predict", str(run / "bundle"), *stored["path"], "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns[:5]) == ["path", "prob_0", "prob_1", "prob_2", "predicted"]
    assert {"ood_score", "out_of_distribution"} <= set(frame.columns)
    P = stored[["prob_0", "prob_1", "prob_2"]].to_numpy()
    np.testing.assert_allclose(frame[["prob_0", "prob_1", "prob_2"]].to_numpy(), P, atol=1e-5)
    assert frame["predicted"].astype(str).tolist() == [GRADES[k] for k in P.argmax(axis=1)]
    model = tlfusion.load_bundle(run / "bundle")
    assert model.classes_.tolist() == list(GRADES) and model.threshold is None
    proba = model.predict_proba(stored["path"].tolist())
    assert proba.shape == (len(stored), 3)
    np.testing.assert_allclose(proba, P, atol=1e-5)
    assert model.predict(stored["path"].tolist()).tolist() == frame["predicted"].astype(str).tolist()


def test_evaluate_command_scores_the_bundle_on_the_test_split(run, graded, tmp_path):
    """`tlfusion evaluate` on the experiment's test split gives the run's own test row of the selected model."""
    out = tmp_path / "evaluated"
    out.mkdir()
    assert main(["evaluate", str(run / "bundle"), "--data", str(graded.parent / "grades.yaml"), "--out", str(out)]) == 0
    evaluated = json.loads((out / "metrics.json").read_text())
    recorded = json.loads((run / "metrics.json").read_text())
    (row,) = evaluated["results"]
    (own,) = [r for r in recorded["results"] if r["model"] == recorded["selected"] and r["split"] == "test"]
    assert row["confusion"] == own["confusion"]
    assert row["quadratic_kappa"] == pytest.approx(own["quadratic_kappa"], abs=1e-9)
    assert (out / "report.html").is_file()


def test_explanations_show_the_predicted_and_the_true_class(run):
    """Every explained case has the predicted class's Grad-CAM and LIME, and the true class's where they differ."""
    review = pd.read_csv(run / "explanations" / "review.csv", dtype=str)
    assert len(review) == 3
    for _, case in review.iterrows():
        explained = case["explained"].split("|")
        assert explained[0] == case["predicted"]
        assert explained[1:] == ([] if case["predicted"] == case["true_label"] else [case["true_label"]])
        images = case["images"].split("|")
        assert len(images) == 1 + 2 * len(explained)
        assert all((run / "explanations" / name).read_bytes()[:4] == b"\x89PNG" for name in images)
    assert "true " in (run / "explanations" / "index.html").read_text()


def test_a_k_class_bundle_is_refused_by_the_binary_explainer(run, tmp_path):
    bundle = load_bundle(run / "bundle")
    with pytest.raises(InputError, match="binary bundles; this one has 3 classes"):
        explain_cases(bundle, [str(next((run.parent / "data" / "images").iterdir()))], None, tmp_path)


def test_softmax_fine_tuning_trains_a_k_way_head(graded, tmp_path):
    from tlfusion.backbones.registry import HEAD_LAYER, load_model_file
    from tlfusion.training.finetune import finetune
    from tlfusion.training.task import TrainSettings

    table = pd.read_csv(graded / "labels.csv").rename(columns={"grade": "label"})
    table = table.assign(path=[str(graded / p) for p in table["path"]], label=table["label"].astype(str))
    table["split"] = np.where(np.arange(len(table)) % 3 == 0, "val", "train")
    result = finetune(
        table,
        "mobilenetv2",
        tmp_path,
        TrainSettings(image_size=32, epochs=1, warmup_epochs=1, batch_size=8, options={"alpha": 0.35}),
        classes=list(GRADES),
        verbose=0,
    )
    model = load_model_file(result.model_path)
    assert model.get_layer(HEAD_LAYER).units == 3
    assert json.loads((tmp_path / "train.json").read_text())["classes"] == list(GRADES)


def test_k_class_metrics_match_scikit_learn_on_fixed_predictions():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 120)
    P = rng.dirichlet(np.ones(4), 120)
    P[np.arange(120), y] += rng.random(120)
    P /= P.sum(axis=1, keepdims=True)
    pred = P.argmax(axis=1)
    row = class_metrics(y, P, ["a", "b", "c", "d"])
    assert row["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert row["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro"))
    assert row["kappa"] == pytest.approx(sk.cohen_kappa_score(y, pred))
    assert row["quadratic_kappa"] == pytest.approx(sk.cohen_kappa_score(y, pred, weights="quadratic"))
    assert row["macro_auroc"] == pytest.approx(sk.roc_auc_score(y, P, multi_class="ovr"))
    for k, entry in enumerate(row["per_class"]):
        tn, fp, fn, tp = sk.confusion_matrix(y == k, pred == k).ravel()
        assert entry["sensitivity"] == pytest.approx(tp / (tp + fn))
        assert entry["specificity"] == pytest.approx(tn / (tn + fp))
        assert entry["f1"] == pytest.approx(sk.f1_score(y == k, pred == k))
        assert entry["auroc"] == pytest.approx(sk.roc_auc_score(y == k, P[:, k]))
    intervals, per_class = class_bootstrap_ci(y, P, np.arange(120) // 3, n_boot=200)
    assert intervals["quadratic_kappa"][0] < row["quadratic_kappa"] < intervals["quadratic_kappa"][1]
    assert per_class[2]["auroc"][0] < row["per_class"][2]["auroc"] < per_class[2]["auroc"][1]
    shuffled = rng.permutation(P)
    delta = paired_class_delta(y, P, shuffled, None, n_boot=200)["accuracy"]
    assert delta["delta"] == pytest.approx(row["accuracy"] - sk.accuracy_score(y, shuffled.argmax(axis=1)))
    assert delta["ci"][0] > 0


def test_cut_point_aurocs_match_scikit_learn_on_fixed_predictions():
    """Grade >= c scored by the summed probabilities of c and above, as scikit-learn's binary AUROC; the patient
    bootstrap interval holds it; a cut with no image above it is undefined."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 150)
    P = rng.dirichlet(np.ones(4), 150)
    P[np.arange(150), y] += rng.random(150)
    P /= P.sum(axis=1, keepdims=True)
    cuts = cut_aurocs(y, P, ["a", "b", "c", "d"])
    assert [entry["cut"] for entry in cuts] == ["b", "c", "d"]
    for k, entry in enumerate(cuts, start=1):
        assert entry["positives"] == int((y >= k).sum())
        assert entry["auroc"] == pytest.approx(sk.roc_auc_score(y >= k, P[:, k:].sum(axis=1)))
    assert cuts[0]["auroc"] != pytest.approx(sk.roc_auc_score(y >= 1, P[:, 1]))  # the summed score, not P(b)
    intervals = cut_auroc_ci(y, P, np.arange(150) // 3, n_boot=200)
    assert all(low < entry["auroc"] < high for entry, (low, high) in zip(cuts, intervals, strict=True))
    assert cut_aurocs(np.minimum(y, 2), P, ["a", "b", "c", "d"])[2]["auroc"] is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"classifiers": {"scoring": "f1"}}, "classifiers.scoring: 'f1' is for binary tasks"),
        ({"classes": ["0", "1"]}, "classes: a multiclass experiment needs at least 3"),
        ({"positive_class": "2"}, "positive_class: a multiclass experiment has no positive class"),
        ({"ordinal": False}, "finetune.head: 'ordinal' needs 'ordinal: true'"),
        ({"evaluate": {"calibration": "sigmoid"}}, "evaluate.calibration: not available for multiclass"),
        ({"classes": ["0", "1", "3"]}, "classes: the data has label(s) ['2'] not listed"),
        ({"classes": ["0", "1", "2", "4"]}, "classes: no images of class(es) ['4']"),
    ],
)
def test_bad_multiclass_settings_exit_2_naming_the_key(graded, tmp_path, capsys, changes, message):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(experiment(graded, **changes)))
    assert main(["run", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error


def test_a_binary_experiment_refuses_multiclass_keys(graded, tmp_path, capsys):
    binary = experiment(graded, task="binary", positive_class="2", ordinal=False, finetune={"enabled": False})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(binary | {"classifiers": {"scoring": "quadratic_kappa"}}))
    assert main(["run", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "classifiers.scoring: 'quadratic_kappa' is for multiclass tasks" in capsys.readouterr().err


def test_class_order_is_numeric_for_numeric_names_and_the_scoring_follows_ordinal(graded):
    from tlfusion.config.experiment import Experiment
    from tlfusion.data.table import class_order

    assert class_order(pd.Series(["10", "2", "1", "2"])) == ["1", "2", "10"]
    assert class_order(pd.Series(["virus", "normal", "bacteria"])) == ["bacteria", "normal", "virus"]
    with pytest.raises(InputError, match="needs at least 3 labels"):
        class_order(pd.Series(["a", "b"]))
    plain = experiment(graded, ordinal=False, finetune={"head": "softmax"})
    assert Experiment.model_validate(plain).classifiers.scoring == "macro_f1"
    assert Experiment.model_validate(experiment(graded)).classifiers.scoring == "quadratic_kappa"
    chosen = experiment(graded, classifiers={"scoring": "balanced_accuracy"})
    assert Experiment.model_validate(chosen).classifiers.scoring == "balanced_accuracy"
