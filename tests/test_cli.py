"""The `tlfusion` command end to end on a tiny folder dataset with a tiny real Keras backbone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tlfusion.backbones.registry import build_backbone
from tlfusion.cli import build_parser, main
from tlfusion.config.experiment import load_experiment
from tlfusion.evaluation.schema import validate_metrics
from tlfusion.fewshot.evaluation import run_fewshot

TINY_BACKBONE = {"name": "mobilenetv2", "options": {"alpha": 0.35}}


def tiny_experiment(folder: Path, data_root: Path, **changes) -> Path:
    raw = {
        "name": "tiny",
        "positive_class": "abnormal",
        "data": {"format": "folder", "root": str(data_root)},
        "split": {"test_fraction": 0.25, "val_fraction": 0.25},
        "image": {"size": 32},
        "backbones": [TINY_BACKBONE, TINY_BACKBONE],
        "finetune": {"warmup_epochs": 1, "epochs": 1, "batch_size": 8},
        "classifiers": {"models": ["lr", "xgb"], "cv": 3},
        "evaluate": {"bootstrap": 50},
        "explain": {"cases": 2, "lime_samples": 20},
        **changes,
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "command",
    ["demo", "run", "pretrain", "finetune", "extract", "fit", "evaluate", "predict", "explain", "fewshot", "data"],
)
def test_each_contract_command_exists_and_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0  # an unknown command exits 2
    assert capsys.readouterr().out.startswith(f"usage: tlfusion {command}")


def test_an_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["nope", "--help"])
    assert exit_info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classifiers": {"models": ["lr", "nope"]}}, "nope"),
        ({"finetune": {"epochz": 1}}, "finetune.epochz"),
        ({"backbones": [{"name": "resnet9000"}]}, "resnet9000"),
        ({"positive_class": "fractured"}, "positive_class"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(tmp_path, folder_dataset, capsys, change, message):
    code = main(["run", str(tiny_experiment(tmp_path, folder_dataset, **change)), "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and len(error.splitlines()) == 1


def test_data_command_prints_a_summary(tmp_path, folder_dataset, capsys):
    assert main(["data", str(tiny_experiment(tmp_path, folder_dataset))]) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out)
    assert summary["classes"] == {"abnormal": 12, "normal": 12} and summary["images"] == 24
    assert summary["patients"] == 24 and "each image is its own patient" in printed.err


def test_unreadable_image_exits_2_or_is_skipped(tmp_path, folder_dataset, capsys):
    (folder_dataset / "normal" / "broken.png").write_bytes(b"not a png")
    experiment = str(tiny_experiment(tmp_path, folder_dataset))
    assert main(["extract", experiment, "--out", str(tmp_path / "a")]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["data", experiment]) == 0  # reading the table does not decode
    assert (
        main(["extract", experiment, "--out", str(tmp_path / "b"), "--skip-bad", "--set", "finetune.enabled=false"])
        == 0
    )
    skipped = json.loads((tmp_path / "b" / "data" / "skipped.json").read_text())
    assert skipped[0]["path"].endswith("broken.png")


def test_run_end_to_end_then_rerun_skips_and_bundle_commands(tmp_path, folder_dataset, capsys):
    experiment = str(tiny_experiment(tmp_path, folder_dataset))
    run = tmp_path / "run"
    assert main(["run", experiment, "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    validate_metrics(metrics)  # the one schema every producer of metrics.json writes
    names = {row["model"] for row in metrics["results"]}
    assert names == {f"{s}/{c}" for s in ("mobilenetv2", "mobilenetv2_2", "fusion") for c in ("lr", "xgb")}
    assert metrics["selected"] in names
    test_rows = [r for r in metrics["results"] if r["split"] == "test"]
    assert all(
        set(r)
        >= {"model", "level", "split", "n", "accuracy", "f1", "kappa", "auroc", "sensitivity", "specificity", "ci"}
        for r in test_rows
    )
    paired = {(row["classifier"], row["single"]) for row in metrics["fusion_vs_single"] if row["level"] == "image"}
    assert paired == {(c, f"{s}/{c}") for s in ("mobilenetv2", "mobilenetv2_2") for c in ("lr", "xgb")}
    for produced in ("report.md", "report.html", "run.log", "explanations/index.html", "bundle/manifest.json"):
        assert (run / produced).is_file(), produced
    assert list((run / "plots").glob("*.png"))
    backbones = run / "bundle" / "backbones"
    assert {p.stem for p in backbones.glob("*.onnx")} == {p.stem for p in backbones.glob("*.keras")}  # from the cache

    assert main(["run", experiment, "--out", str(run)]) == 0
    log = (run / "run.log").read_text()
    assert log.count("stage finetune unchanged, skipped") == 1 and log.count("stage fit unchanged, skipped") == 1

    fitted = pd.read_csv(run / "fit" / "predictions.csv")
    fitted = fitted[(fitted["model"] == metrics["selected"]) & (fitted["split"] == "test")].head(3)
    images = fitted["path"].tolist()
    out_csv = tmp_path / "pred.csv"
    assert main(["predict", str(run / "bundle"), *images, "--out", str(out_csv)]) == 0
    predictions = pd.read_csv(out_csv)
    assert predictions["path"].tolist() == images  # the bundle reproduces the run's test predictions
    np.testing.assert_allclose(predictions["prob_abnormal"], fitted["prob"], atol=1e-4)
    threshold = json.loads((run / "fit" / "selection.json").read_text())["thresholds"][metrics["selected"]]
    expected = np.where(predictions["prob_abnormal"] >= threshold, "abnormal", "normal")
    assert predictions["predicted"].tolist() == expected.tolist()
    assert predictions["threshold"].tolist() == pytest.approx([threshold] * 3)
    assert predictions["out_of_distribution"].dtype == bool and (run / "bundle" / "ood.npz").is_file()
    summary = capsys.readouterr().err
    assert "tlfusion: 3 images scored: " in summary and f"CSV written to {out_csv}" in summary

    assert main(["evaluate", str(run / "bundle"), "--data", experiment, "--out", str(tmp_path / "eval")]) == 0
    evaluation = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    (evaluated,) = validate_metrics(evaluation).model_dump()["results"]
    (in_run,) = [r for r in test_rows if r["model"] == metrics["selected"] and r["level"] == "image"]
    assert evaluated["n"] == in_run["n"] and evaluated["auroc"] == pytest.approx(in_run["auroc"], abs=1e-3)

    tampered = tmp_path / "tampered"
    shutil.copytree(run / "bundle", tampered)
    (tampered / "bundle.json").write_text((tampered / "bundle.json").read_text() + " ")
    capsys.readouterr()
    assert main(["predict", str(tampered), images[0]]) == 2
    assert "bundle.json" in capsys.readouterr().err


@pytest.mark.parametrize("region", ["humerus", "wrist"])
def test_shipped_mura_experiment_splits_the_official_layout_given_data_root(tmp_path, mura_tree, region):
    """experiments/mura_<region>.yaml unchanged, with --data-root: train/val from `train` (patient-grouped),
    test = the official `valid` split, one region only."""
    experiment = Path(__file__).resolve().parents[1] / "experiments" / f"mura_{region}.yaml"
    data_root = ["--data-root", str(mura_tree.parent)]
    run = tmp_path / "run"
    assert main(["data", str(experiment), *data_root]) == 0
    assert main(["finetune", str(experiment), *data_root, "--out", str(run), "--set", "finetune.enabled=false"]) == 0
    table = pd.read_csv(run / "data" / "table.csv", dtype={"patient": str})
    assert set(table["region"]) == {region}
    from_valid = table["path"].str.contains("/valid/")
    assert (table.loc[from_valid, "split"] == "test").all() and (table.loc[~from_valid, "split"] != "test").all()
    train, val = (set(table.loc[table["split"] == part, "patient"]) for part in ("train", "val"))
    assert train and val and not train & val


def pretrained_on(folder: Path, images: list[Path]) -> Path:
    """A tiny MobileNetV2 weights file with a `seen_images.txt` listing ``images``, as `tlfusion pretrain` writes."""
    from tlfusion.backbones.registry import build_backbone
    from tlfusion.data.images import file_sha256

    folder.mkdir(parents=True)
    path = folder / "model.keras"
    build_backbone("mobilenetv2", 32, alpha=0.35).save(path)
    (folder / "seen_images.txt").write_text("".join(f"{file_sha256(image)}  {image.name}\n" for image in images))
    return path


def test_a_backbone_pretrained_on_test_images_is_recorded_and_flagged(tmp_path, folder_dataset):
    weights = pretrained_on(tmp_path / "pretrained", sorted(folder_dataset.rglob("*.png")))
    backbone = {**TINY_BACKBONE, "weights": str(weights)}
    changes = {"backbones": [backbone], "finetune": {"enabled": False}, "explain": {"enabled": False}}
    run = tmp_path / "run"
    assert main(["run", str(tiny_experiment(tmp_path, folder_dataset, **changes)), "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    test_images = (pd.read_csv(run / "data" / "table.csv")["split"] == "test").sum()
    assert metrics["test_images_seen_in_pretraining"] == {"mobilenetv2": test_images} and test_images > 0
    assert "pretrained on test images (mobilenetv2 on" in (run / "report.md").read_text()
    assert "test scores are optimistic" in (run / "run.log").read_text()


def test_fewshot_refuses_images_the_extractor_was_trained_on(tmp_path, folder_dataset, capsys):
    weights = pretrained_on(tmp_path / "pretrained", [next(folder_dataset.rglob("*.png"))])
    changes = {
        "task": "fewshot",
        "backbones": [{**TINY_BACKBONE, "weights": str(weights)}],
        "split": {"test_fraction": None, "val_fraction": 0},
        "fewshot": {"shots": 2, "queries": 2, "episodes": 4, "shots_curve": [1]},
    }
    experiment = str(tiny_experiment(tmp_path, folder_dataset, **changes))
    assert main(["run", experiment, "--out", str(tmp_path / "run")]) == 2
    assert "1 evaluated image(s) were in its training data" in capsys.readouterr().err


def test_fewshot_run_and_command_with_multiscale_features(tmp_path, folder_dataset, capsys):
    changes = {
        "task": "fewshot",
        "backbones": [TINY_BACKBONE],
        "split": {"test_fraction": None, "val_fraction": 0},
        "features": {"stages": 2},
        "fewshot": {"shots": 2, "queries": 2, "episodes": 20, "shots_curve": [1, 2]},
    }
    experiment = str(tiny_experiment(tmp_path, folder_dataset, **changes))
    run = tmp_path / "run"
    assert main(["run", experiment, "--out", str(run)]) == 0
    result = json.loads((run / "fewshot.json").read_text())
    spec, table = load_experiment(experiment).fewshot, pd.read_csv(run / "data" / "table.csv", dtype=str)
    X, y, groups = np.load(run / "features" / "mobilenetv2.npy"), table["label"].to_numpy(), table["patient"].to_numpy()
    expected = run_fewshot(X, y, groups, spec.ways, spec.shots, spec.queries, spec.episodes, spec.classifier, seed=0)
    assert result["episodes"] == 20 and result["auroc"] == expected["auroc"]  # every image of the pool, as stored
    assert result["auroc"]["ci95"][0] <= result["auroc"]["mean"] <= result["auroc"]["ci95"][1]
    assert (run / "plots" / "fewshot_auroc_vs_shots.png").stat().st_size > 0
    model = build_backbone("mobilenetv2", 32, alpha=0.35)
    widths = [model.get_layer(name).output.shape[-1] for name in ("block_13_expand_relu", "out_relu")]
    assert np.load(run / "features" / "mobilenetv2.npy").shape == (24, sum(widths))

    args = ["fewshot", "--data", experiment, "--stages", "1", "--episodes", "20", "--queries", "2", "--shots", "2"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    assert np.load(tmp_path / "single" / "features" / "mobilenetv2.npy").shape == (24, widths[-1])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["episodes"] == 20


def test_identical_files_under_two_names_are_one_patient_in_one_part(tmp_path, folder_dataset):
    from tlfusion.pipeline import Pipeline

    for i in range(4):  # four abnormal images copied under new names
        shutil.copy(folder_dataset / "abnormal" / f"img{i}.png", folder_dataset / "abnormal" / f"copy{i}.png")
    pipeline = Pipeline(load_experiment(tiny_experiment(tmp_path, folder_dataset)), tmp_path / "run")
    pipeline.run(until="data")
    table = pipeline.table.assign(name=lambda t: t["path"].map(lambda path: Path(path).stem))
    for i in range(4):
        twins = table[table["name"].isin([f"img{i}", f"copy{i}"]) & table["path"].str.contains("abnormal")]
        assert len(twins) == 2 and twins["patient"].nunique() == 1 and twins["split"].nunique() == 1
    summary = json.loads((tmp_path / "run" / "data" / "summary.json").read_text())
    assert summary["identical_image_copies"] == 4 and summary["patients"] == 24  # the copies add no patient


def test_demo_takes_set_overrides_and_refuses_an_unknown_key(tmp_path, capsys, monkeypatch):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", "finetune.epochz=1"]) == 2
    assert "finetune.epochz: unknown key (did you mean 'epochs'?)" in capsys.readouterr().err
    runs = []

    class RecordingPipeline:
        def __init__(self, experiment, run_dir, **options):
            runs.append((experiment, run_dir))

        def run(self, until=None):
            pass

    monkeypatch.setattr("tlfusion.pipeline.Pipeline", RecordingPipeline)
    overrides = ["--set", "finetune.epochs=1", "--set", "explain.cases=0"]
    assert main(["demo", "--out", str(tmp_path / "demo"), *overrides]) == 0
    ((experiment, run_dir),) = runs
    assert (experiment.name, experiment.finetune.epochs, experiment.explain.cases) == ("demo", 1, 0)
    assert run_dir == tmp_path / "demo"
