"""Subgroup metrics, extra CSV columns, and a calibrated run with subgroups end to end (metrics, report, bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import write_png, xray_like
from tests.test_cli import TINY_BACKBONE
from tlfusion.bundle.folder import load_bundle
from tlfusion.cli import main
from tlfusion.config.experiment import DataSpec
from tlfusion.data import sources
from tlfusion.errors import InputError
from tlfusion.evaluation import metrics
from tlfusion.evaluation.calibration import calibration_metrics
from tlfusion.evaluation.schema import validate_metrics
from tlfusion.evaluation.subgroups import MIN_IMAGES, MIN_PER_CLASS, NONE, size_warning, subgroup_results, with_columns


def test_small_subgroups_are_warned_about_at_the_stated_threshold():
    enough = np.r_[np.ones(MIN_PER_CLASS), np.zeros(MIN_IMAGES - MIN_PER_CLASS)]
    assert size_warning(enough) is None
    assert "29 images" in size_warning(enough[1:])
    assert f"{MIN_PER_CLASS - 1} positive" in size_warning(np.r_[enough[1:], 0])


def test_each_subgroup_is_scored_on_its_own_rows():
    rng = np.random.default_rng(0)
    rows = pd.DataFrame(
        {
            "model": "fusion/lr",
            "split": "test",
            "path": [f"{i}.png" for i in range(80)],
            "patient": [f"p{i // 2}" for i in range(80)],
            "y_true": np.tile([0, 1], 40),
            "prob": rng.uniform(size=80),
        }
    )
    table = pd.DataFrame({"path": rows["path"], "view": ["PA"] * 50 + ["LL"] * 20 + [""] * 10})
    results = subgroup_results(with_columns(rows, table, ["view"]), ["view"], 0.5, n_boot=30, seed=0)
    assert [(r["value"], r["n"]) for r in results] == [(NONE, 10), ("LL", 20), ("PA", 50)]
    pa = rows.iloc[:50]
    expected = metrics.binary_metrics(pa["y_true"], pa["prob"], 0.5)
    assert {key: results[2][key] for key in expected} == expected
    assert results[2]["brier"] == pytest.approx(calibration_metrics(pa["y_true"], pa["prob"])["brier"])
    assert results[2]["warning"] is None and "small subgroup: 20 images" in results[1]["warning"]
    assert set(results[2]["ci"]) >= {"kappa", "auroc", "brier", "ece"}
    with pytest.raises(InputError, match=r"evaluate.subgroups: column\(s\) \['sex'\] not in the data table"):
        with_columns(rows, table, ["sex"])


def write_csv_dataset(root: Path, count: int = 40) -> Path:
    """`root/labels.csv` beside its images: label, hardware, and one-hot view flags (frontal / lateral)."""
    lines = ["path,label,hardware,frontal,lateral"]
    for i in range(count):
        positive = i % 2
        write_png(root / "images" / f"{i}.png", xray_like(i, 32, bright_blob=bool(positive)))
        frontal, lateral = (1, 0) if i % 4 < 2 else (0, 1) if i % 8 < 6 else (1, 1)
        lines.append(f"images/{i}.png,{'abnormal' if positive else 'normal'},{int(i % 5 == 0)},{frontal},{lateral}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_csv_extra_and_one_hot_columns_reach_the_table(tmp_path):
    root = write_csv_dataset(tmp_path / "csv", 8)
    spec = DataSpec(
        format="csv", root=str(root), csv="labels.csv", extra_columns=["hardware"],
        one_hot_columns={"view": ["frontal", "lateral"]},
    )  # fmt: skip
    table = sources.read_sources([spec])
    both = "frontal+lateral"
    assert table["view"].tolist() == ["frontal", "frontal", "lateral", "lateral", "frontal", "frontal", both, both]
    assert table["hardware"].tolist()[:6] == ["1", "0", "0", "0", "0", "1"] and set(table["source"]) == {"csv"}
    with pytest.raises(InputError, match="missing column"):
        sources.read_sources([spec.model_copy(update={"extra_columns": ["sex"]})])
    with pytest.raises(InputError, match=r"\['path'\] would replace the table's own columns"):
        sources.read_sources([spec.model_copy(update={"extra_columns": ["path"]})])


def calibrated_experiment(folder: Path, root: Path, **evaluate) -> Path:
    raw = {
        "name": "calibrated",
        "positive_class": "abnormal",
        "data": {
            "format": "csv",
            "root": str(root),
            "csv": "labels.csv",
            "extra_columns": ["hardware"],
            "one_hot_columns": {"view": ["frontal", "lateral"]},
        },
        "split": {"test_fraction": 0.3, "val_fraction": 0.2},
        "image": {"size": 32},
        "backbones": [TINY_BACKBONE],
        "finetune": {"enabled": False},
        "classifiers": {"models": ["lr", "knn"], "cv": 3},
        "evaluate": {"bootstrap": 20, "calibration": "sigmoid", "subgroups": ["view", "hardware"], **evaluate},
        "explain": {"enabled": False},
    }
    path = folder / "calibrated.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_calibrated_run_reports_before_after_and_subgroups_and_bundles_it(tmp_path, capsys):
    experiment = calibrated_experiment(tmp_path, write_csv_dataset(tmp_path / "csv"))
    run = tmp_path / "run"
    assert main(["run", str(experiment), "--out", str(run)]) == 0
    result = json.loads((run / "metrics.json").read_text())
    validate_metrics(result)
    selected = result["selected"]
    calibration = {(row["model"], row["stage"]): row for row in result["calibration"]["rows"]}
    assert {stage for model, stage in calibration if model == selected} == {"before", "after"}
    assert set(calibration[(selected, "before")]["ci"]) == {"brier", "ece"}
    assert {(row["column"], row["value"]) for row in result["subgroups"]} >= {("hardware", "0"), ("hardware", "1")}
    assert all(row["model"] == selected and row["warning"] for row in result["subgroups"])  # 12 test images
    report = (run / "report.html").read_text()
    assert "Calibration on the test split" in report and "Subgroups" in report and "plots/reliability.png" in report
    assert (run / "plots" / "reliability.png").is_file()

    bundle = load_bundle(run / "bundle")
    assert bundle.calibration is not None
    assert bundle.threshold == pytest.approx(calibration[(selected, "after")]["threshold"])
    fitted = pd.read_csv(run / "fit" / "predictions.csv")
    test = fitted[(fitted["model"] == selected) & (fitted["split"] == "test")].head(4)
    out = tmp_path / "predicted.csv"
    assert main(["predict", str(run / "bundle"), *test["path"], "--out", str(out)]) == 0
    predicted = pd.read_csv(out)
    np.testing.assert_allclose(predicted["prob_abnormal"], bundle.calibration.apply(test["prob"].to_numpy()), atol=1e-4)
    assert (predicted["threshold"] == bundle.threshold).all()


def test_an_unknown_subgroup_column_exits_2_before_any_backbone_runs(tmp_path, capsys):
    experiment = calibrated_experiment(tmp_path, write_csv_dataset(tmp_path / "csv", 8), subgroups=["sex"])
    assert main(["run", str(experiment), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "evaluate.subgroups: column(s) ['sex'] not in the data table" in error[0]
    assert not (tmp_path / "run" / "backbones").exists()


def test_fewshot_episodes_are_also_drawn_within_each_source(tmp_path):
    sets = [write_csv_dataset(tmp_path / name, count) for name, count in (("big", 12), ("tiny", 4))]
    raw = {
        "name": "fewshot_sources",
        "task": "fewshot",
        "data": [{"format": "csv", "root": str(root), "csv": "labels.csv"} for root in sets],
        "split": {"test_fraction": None, "val_fraction": 0},
        "image": {"size": 32},
        "backbones": [TINY_BACKBONE],
        "fewshot": {"ways": 2, "shots": 2, "queries": 2, "episodes": 10, "shots_curve": [1]},
        "evaluate": {"subgroups": ["source"]},
    }
    (tmp_path / "fewshot.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "fewshot.yaml"), "--out", str(tmp_path / "run")]) == 0
    sources_ = json.loads((tmp_path / "run" / "fewshot.json").read_text())["subgroups"]["source"]
    assert sources_["big"]["images"] == 12 and 0 <= sources_["big"]["auroc"]["mean"] <= 1
    assert sources_["tiny"]["images"] == 4 and "skipped" in sources_["tiny"]  # 2 per class: no 2-shot 2-query episode
