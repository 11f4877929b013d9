"""Selected on cross-validation, never on test: the fit stage ignores the test split's labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tlfusion.config.experiment import load_experiment
from tlfusion.data.splits import grouped_folds
from tlfusion.features.fusion import FeatureFusion
from tlfusion.pipeline import Pipeline
from tlfusion.stages import fit as fit_stage

N_PATIENTS, IMAGES_PER_PATIENT = 30, 2


def fit_run(folder: Path, data_root: Path, features: dict[str, np.ndarray], table: pd.DataFrame, monkeypatch):
    """Run the fit stage as `tlfusion fit` does on a prepared run folder; returns what it chose and predicted."""
    folder.mkdir()
    experiment = folder / "tiny.yaml"
    raw = {
        "name": "tiny",
        "positive_class": "abnormal",
        "data": {"format": "folder", "root": str(data_root)},
        "backbones": [{"name": "mobilenetv2"}, {"name": "mobilenetv2"}],
        "classifiers": {"models": ["lr", "knn"], "cv": 3},
    }
    experiment.write_text(yaml.safe_dump(raw))
    run = folder / "run"
    (run / "data").mkdir(parents=True)
    (run / "features").mkdir()
    table.to_csv(run / "data" / "table.csv", index=False)
    for key, block in features.items():
        np.save(run / "features" / f"{key}.npy", block)
    saved = []
    monkeypatch.setattr(fit_stage, "save_run_bundle", lambda run, selected, *rest: saved.append((selected, rest[-1])))
    fit_stage.fit_binary(Pipeline(load_experiment(experiment), run))
    selection = json.loads((run / "fit" / "selection.json").read_text())
    return selection, saved, pd.read_csv(run / "fit" / "predictions.csv")


def synthetic_run_inputs(seed: int = 0) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Two backbones' features (a weak label signal plus noise) and a patient-grouped train/val/test table."""
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(N_PATIENTS), IMAGES_PER_PATIENT)
    y = np.repeat(np.arange(N_PATIENTS) % 2, IMAGES_PER_PATIENT)
    split = np.repeat(np.array(["train", "val", "test"])[np.arange(N_PATIENTS) % 5 // 2], IMAGES_PER_PATIENT)
    table = pd.DataFrame(
        {
            "path": [f"img{i}.png" for i in range(len(y))],
            "label": np.where(y == 1, "abnormal", "normal"),
            "patient": patient.astype(str),
            "study": patient.astype(str),
            "split": split,
            "y": y,
        }
    )
    features = {
        key: rng.normal(size=(len(y), 6)) + 0.8 * y[:, None] * rng.random(6) for key in ("mobilenetv2", "mobilenetv2_2")
    }
    return features, table


def permuted_test_labels(table: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    """The same table with the test rows' labels shuffled across test patients (train and val untouched)."""
    test = table["split"] == "test"
    test_patients = table.loc[test, "patient"].unique()
    flipped = dict(zip(test_patients, np.random.default_rng(seed).permutation(test_patients), strict=True))
    label_of = table.groupby("patient")["y"].first()
    y = table["y"].where(~test, table["patient"].map(flipped).map(label_of)).astype(int)
    return table.assign(y=y, label=np.where(y == 1, "abnormal", "normal"))


def test_permuting_test_labels_leaves_selection_and_thresholds_unchanged(tmp_path, folder_dataset, monkeypatch):
    features, table = synthetic_run_inputs()
    permuted = permuted_test_labels(table)
    test = table["split"] == "test"
    assert (permuted.loc[test, "y"] != table.loc[test, "y"]).sum() >= 4  # the permutation moves labels
    assert permuted.loc[~test].equals(table.loc[~test])

    original = fit_run(tmp_path / "a", folder_dataset, features, table, monkeypatch)
    shuffled = fit_run(tmp_path / "b", folder_dataset, features, permuted, monkeypatch)
    selection, saved, predictions = original
    assert selection == shuffled[0] and saved == shuffled[1]  # selected model, CV scores, thresholds, bundle
    assert set(selection["cv_scores"]) == {
        f"{s}/{c}" for s in ("mobilenetv2", "mobilenetv2_2", "fusion") for c in ("lr", "knn")
    }
    on_test = predictions["split"] == "test"
    assert (predictions.loc[on_test, "y_true"] != shuffled[2].loc[on_test, "y_true"]).any()
    pd.testing.assert_series_equal(predictions["prob"], shuffled[2]["prob"])  # CV and test probabilities alike


class RecordingFusion(FeatureFusion):
    """The experiment's fusion transform, recording the rows (as bytes) each fit sees."""

    fits: list[set[bytes]] = []

    def fit(self, X, y=None):
        RecordingFusion.fits.append(row_set(X))
        return super().fit(X, y)


def test_each_cv_fold_fits_its_own_fusion_on_its_training_rows_only(tmp_path, folder_dataset, monkeypatch):
    features, table = synthetic_run_inputs()
    monkeypatch.setattr(RecordingFusion, "fits", [])
    monkeypatch.setattr(fit_stage, "make_fusion", lambda run, block_sizes: RecordingFusion(block_sizes=block_sizes))
    fit_run(tmp_path / "a", folder_dataset, features, table, monkeypatch)

    is_fit = table["split"].isin(["train", "val"]).to_numpy()
    folds = grouped_folds(table["y"][is_fit], table["patient"][is_fit], 3, seed=0, what="cv")
    X = np.hstack([features["mobilenetv2"], features["mobilenetv2_2"]])[is_fit]  # the fusion feature set
    fusion_fits = [fit for fit in RecordingFusion.fits if len(next(iter(fit))) == X[0].nbytes]
    fold_fits = [row_set(X[train]) for train, _ in folds]
    # CV of lr then knn, each fold fitting its own fusion on that fold's training rows; then each refit on all rows
    assert fusion_fits == fold_fits * 2 + [row_set(X)] * 2
    for (_, held_out), fit in zip(folds, fusion_fits, strict=False):
        assert not fit & row_set(X[held_out])  # no fold's fusion saw the rows it was scored on


def row_set(X: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.asarray(X, dtype=float)}
