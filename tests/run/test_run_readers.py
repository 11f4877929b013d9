"""Damaged files in a run folder: what later stages read back (features, fit/selection.json, fit/predictions.csv,
metrics.json) re-runs the stage that wrote it; cache entries (feature chunks, data/scan.json) are recomputed. A
reader refuses a bad file with one InputError naming it; nothing is loaded from a pickle or read from a FIFO."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import write_folder_dataset
from tlfusion.cli import main
from tlfusion.errors import InputError
from tlfusion.run.paths import RunPaths
from tlfusion.run.readers import read_features, read_json_object, read_predictions, read_selection


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("experiment")
    write_folder_dataset(folder / "data")
    raw = {
        "name": "runfiles",
        "positive_class": "abnormal",
        "data": {"format": "folder", "root": str(folder / "data")},
        "split": {"test_fraction": 0.25, "val_fraction": 0.25},
        "image": {"size": 32},
        "backbones": [{"name": "mobilenetv2", "options": {"alpha": 0.35}}],
        "finetune": {"enabled": False},
        "features": {"engine": "keras"},
        "classifiers": {"models": ["lr"], "cv": 2},
        "evaluate": {"bootstrap": 10},
        "explain": {"enabled": False},
    }
    path = folder / "runfiles.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def finished(experiment, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", str(experiment), "--out", str(run)]) == 0
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    return shutil.copytree(finished, tmp_path / "run")


def results(run: Path) -> list:
    return json.loads((run / "metrics.json").read_text())["results"]


def write_objects(path: Path) -> None:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)


def make_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def garbage(path: Path) -> None:
    path.write_bytes(b"\xff\xfe not what was written \x00")


def wrong_rows(path: Path) -> None:
    np.save(path, np.zeros((3, 4), np.float32))


def selection_list(path: Path) -> None:
    path.write_text("[]")


def bad_threshold(path: Path) -> None:
    selection = json.loads(path.read_text())
    selection["thresholds"] = {name: 7 for name in selection["thresholds"]}
    path.write_text(json.dumps(selection))


def no_prob_column(path: Path) -> None:
    path.write_text(path.read_text().replace(",prob", ",p", 1))


@pytest.mark.parametrize(
    ("relative", "damage", "stage"),
    [
        ("features/mobilenetv2.npy", write_objects, "extract"),
        ("features/mobilenetv2.npy", make_fifo, "extract"),
        ("features/mobilenetv2.npy", wrong_rows, "extract"),
        ("fit/selection.json", garbage, "fit"),
        ("fit/selection.json", bad_threshold, "fit"),
        ("fit/predictions.csv", no_prob_column, "fit"),
        ("metrics.json", selection_list, "evaluate"),
    ],
    ids=["features-objects", "features-fifo", "features-rows", "selection-garbage", "selection-threshold",
         "predictions-column", "metrics-list"],
)  # fmt: skip
def test_damaged_stage_output_reruns_its_stage_with_the_same_results(
    run, finished, experiment, relative: str, damage: Callable[[Path], None], stage: str
):
    damage(run / relative)
    assert main(["run", str(experiment), "--out", str(run)]) == 0
    log = (run / "run.log").read_text()
    assert f"{run / relative}: " in log and f"re-running stage {stage}" in log
    assert (run / relative).is_file() and results(run) == results(finished)


@pytest.mark.parametrize("damage", [garbage, make_fifo], ids=["garbage", "fifo"])
def test_unreadable_feature_cache_chunk_is_ignored_and_recomputed(run, finished, experiment, damage):
    (chunk,) = run.glob("cache/*/chunk-*.txt")
    damage(chunk)
    (run / "features" / "mobilenetv2.npy").unlink()  # so that extract runs and reads the cache
    assert main(["run", str(experiment), "--out", str(run)]) == 0
    assert f"ignoring unreadable cache chunk {chunk}" in (run / "run.log").read_text()
    assert results(run) == results(finished)


def test_cache_chunks_of_different_widths_exit_2_naming_the_cache(run, experiment, capsys):
    (chunk,) = run.glob("cache/*/chunk-*.txt")
    hashes, rows = chunk.read_text().split(), np.load(chunk.with_suffix(".npy"))
    half = len(hashes) // 2
    chunk.write_text("".join(f"{h}\n" for h in hashes[half:]))  # the second half keeps its real features
    np.save(chunk.with_suffix(".npy"), rows[half:])
    other = chunk.with_name("chunk-0.txt")  # the first half is 5 wide
    other.write_text("".join(f"{h}\n" for h in hashes[:half]))
    np.save(other.with_suffix(".npy"), np.zeros((half, 5), np.float32))
    (run / "features" / "mobilenetv2.npy").unlink()
    capsys.readouterr()
    assert main(["run", str(experiment), "--out", str(run)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("tlfusion: error: ") and str(chunk.parent) in error and "different widths" in error


def test_unreadable_scan_cache_is_rebuilt(run, finished, experiment):
    garbage(run / "data" / "scan.json")
    assert main(["run", str(experiment), "--out", str(run)]) == 0
    assert "scanning every image again" in (run / "run.log").read_text()
    assert json.loads((run / "data" / "scan.json").read_text()) == json.loads(
        (finished / "data" / "scan.json").read_text()
    )


# ----------------------------------------------------------------------------- the readers


def fit_folder(tmp_path: Path, selection: object, predictions: str) -> Path:
    (tmp_path / "fit").mkdir()
    (tmp_path / "fit" / "selection.json").write_text(json.dumps(selection))
    (tmp_path / "fit" / "predictions.csv").write_text(predictions)
    return tmp_path


SELECTION = {"selected": "a/lr", "scoring": "kappa", "cv": 2, "cv_scores": {"a/lr": 0.5}, "thresholds": {"a/lr": 0.4}}
PREDICTIONS = "model,split,path,patient,study,y_true,prob\na/lr,test,x.png,1,1,1,0.7\n"


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ([], "expected a JSON object"),
        ({**SELECTION, "selected": "b/lr"}, "'selected' must name a model"),
        ({**SELECTION, "thresholds": {"a/lr": "0.4"}}, "'thresholds' must map"),
        ({k: v for k, v in SELECTION.items() if k != "cv_scores"}, "missing key(s) cv_scores"),
    ],
)
def test_bad_selection_is_refused_naming_it(tmp_path, selection, message):
    folder = fit_folder(tmp_path, selection, PREDICTIONS)
    with pytest.raises(InputError, match="selection.json: " + message.replace("(", r"\(").replace(")", r"\)")):
        read_selection(RunPaths(folder))


@pytest.mark.parametrize(
    ("predictions", "message"),
    [
        ("", "unreadable CSV"),
        (PREDICTIONS.replace("0.7", "1.5"), "prob in"),
        (PREDICTIONS.replace(",1,0.7", ",2,0.7"), "y_true 0 or 1"),
        (PREDICTIONS.replace("a/lr,test", "c/rf,test"), "not in fit/selection.json"),
        (PREDICTIONS.replace("study,", ""), "missing column"),
    ],
)
def test_bad_predictions_are_refused_naming_them(tmp_path, predictions, message):
    folder = fit_folder(tmp_path, SELECTION, predictions)
    with pytest.raises(InputError, match="predictions.csv: .*" + message):
        read_predictions(RunPaths(folder), {"a/lr"})


def test_readers_never_open_a_fifo_or_load_a_pickle(tmp_path):
    os.mkfifo(tmp_path / "metrics.json")
    with pytest.raises(InputError, match="metrics.json: not a regular file"):
        read_json_object(tmp_path / "metrics.json")
    (tmp_path / "x.npy").write_bytes(pickle.dumps({"never": "loaded"}))
    with pytest.raises(InputError, match="x.npy: not a plain numeric array"):
        read_features(tmp_path / "x.npy", 1)
