"""The run's console: library noise kept in run.log, labelled progress, named model-selection lines, closing paths."""

from __future__ import annotations

import logging

import numpy as np
import yaml

from tlfusion.config.experiment import load_experiment
from tlfusion.console import progress, setup_logging
from tlfusion.models.classifiers import select_model
from tlfusion.pipeline import Pipeline


def test_library_loggers_reach_run_log_only(tmp_path, capfd):
    setup_logging(tmp_path)
    logging.getLogger("tensorflow").warning("Instructions for updating: tf noise")
    logging.getLogger("tf2onnx.tfonnx").info("tf2onnx noise")
    logging.getLogger("tf2onnx.graph").debug("tf2onnx graph dump")
    logging.getLogger("absl").warning("absl noise")
    logging.getLogger("tlfusion").info("our line")
    logging.getLogger("tlfusion.features.extraction").debug("our detail")
    for handler in logging.getLogger("tlfusion").handlers:
        handler.flush()
    console = "\n".join(capfd.readouterr())
    assert "our line" in console and "noise" not in console and "our detail" not in console
    run_log = (tmp_path / "run.log").read_text()
    for line in ("tf noise", "tf2onnx noise", "absl noise", "our line", "our detail"):
        assert line in run_log
    assert "graph dump" not in run_log


def test_progress_yields_every_item_in_order():
    assert list(progress(["a", "b", "c"], "fine-tuning")) == ["a", "b", "c"]
    assert list(progress([], "fine-tuning")) == []


def test_model_selection_lines_name_the_feature_set(caplog):
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 12)
    X = rng.normal(size=(24, 3)) + y[:, None]
    with caplog.at_level(logging.INFO, logger="tlfusion"):
        select_model(X, y, None, ["lr"], cv=2, label="fusion")
        select_model(X, y, None, ["lr", "knn"], cv=2)
    lines = [message for message in caplog.messages if message.startswith("select_model:")]
    assert len(lines) == 2  # one line per feature set; each classifier's score and parameters at debug level
    assert lines[0].startswith("select_model: fusion: CV kappa lr ") and "knn" not in lines[0]
    assert lines[1].startswith("select_model: CV kappa lr ") and ", knn " in lines[1]


def test_the_run_ends_naming_report_gallery_and_bundle(tmp_path, folder_dataset, caplog):
    raw = {"name": "t", "positive_class": "abnormal", "data": {"format": "folder", "root": str(folder_dataset)}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({**raw, "backbones": [{"name": "mobilenetv2"}]}))
    run = tmp_path / "run"
    for made in ("report.html", "explanations/index.html", "bundle/manifest.json"):
        (run / made).parent.mkdir(parents=True, exist_ok=True)
        (run / made).write_text("")
    with caplog.at_level(logging.INFO, logger="tlfusion"):
        Pipeline(load_experiment(tmp_path / "t.yaml"), run)._log_outputs()
    assert caplog.messages[1:] == [
        f"report:  {run / 'report.html'}",
        f"gallery: {run / 'explanations/index.html'}",
        f"bundle:  {run / 'bundle'}",
    ]
