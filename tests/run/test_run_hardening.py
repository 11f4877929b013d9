"""Run folders under stress: the signing key in the fit stage's key, killed runs' leftovers, locking, damaged models
and ONNX caches re-made."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.bundle.test_bundle_hardening import KEY
from tests.conftest import SIZE, assert_one_line_error, flip_a_byte, run_cli, truncate
from tlfusion.backbones.registry import build_backbone, feature_model, load_model_file
from tlfusion.bundle import folder as bundle_module
from tlfusion.bundle.signing import KEY_ENV
from tlfusion.config.experiment import load_experiment
from tlfusion.features.onnx_graphs import cached_onnx_graph, onnx_cache_path, onnx_runner, read_cached_onnx
from tlfusion.features.source import ModelSource
from tlfusion.fileio import locked
from tlfusion.pipeline import Pipeline
from tlfusion.run.readers import check_keras_file
from tlfusion.stages.registry import REGISTRY


def test_the_fit_stage_key_depends_on_the_signing_key(tmp_path, experiment, monkeypatch):
    pipeline = Pipeline(load_experiment(experiment), tmp_path / "run")
    keys = []
    for key in (None, KEY, KEY.upper(), KEY):
        if key is None:
            monkeypatch.delenv(KEY_ENV, raising=False)
        else:
            monkeypatch.setenv(KEY_ENV, key)
        keys.append((pipeline.stage_key("fit", "up"), pipeline.stage_key("extract", "up")))
    assert len({fit for fit, _ in keys}) == 3 and keys[1] == keys[3]
    assert len({extract for _, extract in keys}) == 1


@pytest.mark.slow
def test_setting_a_key_reruns_fit_so_the_run_bundle_gets_signed(tmp_path, experiment, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.delenv(KEY_ENV, raising=False)
    overrides = ["--set", "classifiers.models=[lr]", "--set", "classifiers.cv=2"]
    assert run_cli(capsys, "fit", experiment, "--out", run, *overrides)[0] == 0
    assert not (run / "bundle" / "signature.json").exists()
    monkeypatch.setenv(KEY_ENV, KEY)
    assert run_cli(capsys, "fit", experiment, "--out", run, *overrides)[0] == 0
    assert "signed" in bundle_module.load_bundle(run / "bundle").trust


@pytest.fixture
def extracted(tmp_path, experiment, capsys) -> Path:
    """A run folder with the data, finetune (plain backbone) and extract stages done."""
    run = tmp_path / "run"
    assert run_cli(capsys, "extract", experiment, "--out", run)[0] == 0
    return run


def test_killed_runs_leftovers_are_removed_by_the_next_run(extracted, experiment, capsys):
    partial = extracted / ".bundle.k1ll3d.partial"
    (partial / "backbones").mkdir(parents=True)
    (partial / "backbones" / "big.keras").write_bytes(b"\0" * 1000)
    temp = extracted / "data" / ".table.x1y2.tmp.csv"
    temp.write_text("half")
    committed = sorted(extracted.glob("cache/*/chunk-*"))
    uncommitted = committed[0].parent / "chunk-k1ll3d.npy"  # features written, the hash list (the commit) not
    shutil.copy(committed[0].with_suffix(".npy"), uncommitted)
    assert run_cli(capsys, "extract", experiment, "--out", extracted)[0] == 0
    assert not partial.exists() and not temp.exists() and not uncommitted.exists()
    assert sorted(extracted.glob("cache/*/chunk-*")) == committed


def test_a_stage_is_recorded_done_only_after_it_completes(extracted, experiment, capsys, monkeypatch):
    def killed(run):
        raise RuntimeError("killed mid-stage")

    monkeypatch.setitem(REGISTRY, "extract", dataclasses.replace(REGISTRY["extract"], run=killed))
    assert run_cli(capsys, "extract", experiment, "--out", extracted, "--force")[0] == 1
    state = json.loads((extracted / ".stages.json").read_text())
    assert "finetune" in state and "extract" not in state


def test_a_locked_run_folder_is_refused_naming_the_holder(extracted, experiment, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from tlfusion.fileio import locked\nwith locked({str(extracted)!r}): input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(100):  # wait until the holder has written its pid
            if f"pid {holder.pid}" in (extracted / ".lock").read_text():
                break
            time.sleep(0.1)
        code, error = run_cli(capsys, "extract", experiment, "--out", extracted)
        assert_one_line_error(code, error, str(extracted), "in use", f"pid {holder.pid}")
    finally:
        holder.communicate("\n", timeout=30)
    assert run_cli(capsys, "extract", experiment, "--out", extracted)[0] == 0
    with locked(extracted):  # the lock is free again, and held here it refuses this process's own second run
        code, error = run_cli(capsys, "extract", experiment, "--out", extracted)
        assert_one_line_error(code, error, f"pid {os.getpid()}")


@pytest.mark.parametrize("damage", [truncate, flip_a_byte, Path.unlink], ids=["truncated", "flipped", "missing"])
def test_damaged_fine_tuned_model_makes_its_stage_run_again(extracted, experiment, capsys, damage):
    model = extracted / "backbones" / "mobilenetv2" / "model.keras"
    damage(model)
    assert run_cli(capsys, "extract", experiment, "--out", extracted)[0] == 0
    log = (extracted / "run.log").read_text()
    assert f"{model}: " in log and "re-running stage finetune" in log
    check_keras_file(model)
    load_model_file(model, "mobilenetv2")


@pytest.fixture(scope="module")
def tiny_source() -> ModelSource:
    return ModelSource(build_backbone("mobilenetv2", SIZE, alpha=0.35))


@pytest.mark.parametrize(
    "damage",
    [truncate, flip_a_byte, lambda path: path.with_name(path.name + ".sha256").unlink()],
    ids=["truncated", "flipped", "no-checksum"],
)
def test_damaged_cached_onnx_graph_is_converted_again(tmp_path, tiny_source, caplog, damage):
    graph = cached_onnx_graph(tiny_source, tmp_path)
    path = onnx_cache_path(tmp_path, tiny_source.key)
    assert read_cached_onnx(path) == graph
    damage(path)
    assert read_cached_onnx(path) is None
    assert "converting again" in caplog.text and str(path) in caplog.text
    again = cached_onnx_graph(tiny_source, tmp_path)
    assert read_cached_onnx(path) == again
    images_in = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 1)).astype(np.float32)
    run_batch, _ = onnx_runner(again)
    expected = feature_model(tiny_source.model).predict_on_batch(images_in)
    np.testing.assert_allclose(run_batch(images_in), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_run_folder_with_a_damaged_onnx_cache_bundles_a_graph_converted_again(tmp_path, experiment, capsys):
    run, engine = tmp_path / "run", ["--set", "features.engine=auto", "--set", "classifiers.models=[lr]"]
    assert run_cli(capsys, "fit", experiment, "--out", run, *engine, "--set", "classifiers.cv=2")[0] == 0
    (cached,) = run.glob("cache/onnx/*.onnx")
    truncate(cached)
    assert run_cli(capsys, "fit", experiment, "--out", run, *engine, "--set", "classifiers.cv=3")[0] == 0
    assert f"cached ONNX graph {cached} does not match its sha256" in (run / "run.log").read_text()
    (bundled,) = run.glob("bundle/backbones/*.onnx")
    assert bundled.read_bytes() == read_cached_onnx(cached)
    assert bundle_module.load_bundle(run / "bundle").predict_paths([next(run.parent.rglob("img0.png"))]).shape == (1, 2)
