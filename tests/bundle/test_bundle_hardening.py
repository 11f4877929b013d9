"""Damaged, tampered and hostile bundles through `tlfusion predict`: nothing read that the manifest does not list,
signatures checked, exit 2 in one line."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from xgboost import XGBClassifier

from tests.conftest import SIZE, assert_one_line_error, run_cli, write_png, xray_like
from tlfusion.backbones.registry import build_backbone, feature_model
from tlfusion.bundle import folder as bundle_module
from tlfusion.bundle.folder import save_bundle
from tlfusion.bundle.model import Bundle
from tlfusion.bundle.signing import KEY_ENV
from tlfusion.data.images import file_sha256
from tlfusion.features.fusion import FeatureFusion
from tlfusion.models.classifiers import fusion_pipeline

KEY = "correct horse battery staple"


@pytest.fixture(scope="module")
def tiny_bundle() -> Bundle:
    """A tiny bundle with an XGBoost classifier (so it has xgboost/0.ubj)."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (16, SIZE, SIZE, 1)).astype(np.float32)
    images[::2] *= 0.3
    model = build_backbone("mobilenetv2", SIZE, alpha=0.35)
    X = feature_model(model).predict(images, verbose=0)
    fusion = FeatureFusion(block_sizes=[X.shape[1]]).fit(X)
    classifier = XGBClassifier(n_estimators=4, max_depth=2, n_jobs=1).fit(fusion.transform(X), np.tile([0, 1], 8))
    return Bundle({"tiny": model}, fusion_pipeline(fusion, classifier), 0.5, ["normal", "abnormal"], SIZE)


def save_with_key(bundle: Bundle, folder: Path, key: str | None) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(KEY_ENV, raising=False)
        if key is not None:
            patch.setenv(KEY_ENV, key)
        return save_bundle(bundle, folder)


@pytest.fixture(scope="module")
def saved_bundle(tiny_bundle, tmp_path_factory) -> Path:
    return save_with_key(tiny_bundle, tmp_path_factory.mktemp("bundle") / "bundle", None)


@pytest.fixture(scope="module")
def saved_signed_bundle(tiny_bundle, tmp_path_factory) -> Path:
    return save_with_key(tiny_bundle, tmp_path_factory.mktemp("signed") / "bundle", KEY)


@pytest.fixture
def bundle(saved_bundle, tmp_path) -> Path:
    return shutil.copytree(saved_bundle, tmp_path / "bundle")


def rehash(bundle: Path, files: dict | None = None) -> None:
    """Re-write the manifest as a deliberate editor would: every file's current sha256 (or `files` as given)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    listed = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest["files"] = files or {p.relative_to(bundle).as_posix(): file_sha256(p) for p in listed}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def edit_info(bundle: Path, **changes) -> None:
    info = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**info, **changes}))
    rehash(bundle)


@pytest.fixture
def image(tmp_path) -> Path:
    return write_png(tmp_path / "images" / "one.png", xray_like(1))


def test_predict_on_a_folder_with_a_fifo_names_it_and_does_not_hang(saved_bundle, image, tmp_path, capsys):
    os.mkfifo(image.parent / "pipe.png")
    code, error = run_cli(capsys, "predict", saved_bundle, image.parent)
    assert_one_line_error(code, error, "pipe.png", "a FIFO")
    out = tmp_path / "predictions.csv"
    code, error = run_cli(capsys, "predict", saved_bundle, image.parent, "--skip-bad", "--out", out)
    assert code == 0 and "skipped" in error and "pipe.png" in error
    assert out.read_text().count("\n") == 2  # header and one.png


def test_predict_out_pointing_at_a_folder_exits_2(saved_bundle, image, tmp_path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    code, error = run_cli(capsys, "predict", saved_bundle, image, "--out", folder)
    assert_one_line_error(code, error, "--out", "a_folder")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("command", ["run", "evaluate"])
def test_out_that_is_a_file_where_a_folder_is_written_exits_2(experiment, saved_bundle, tmp_path, capsys, command):
    out = tmp_path / "a_file"
    out.write_text("keep me")
    argv = [experiment] if command == "run" else [saved_bundle, "--data", experiment]
    code, error = run_cli(capsys, command, *argv, "--out", out)
    assert_one_line_error(code, error, "--out", "a_file")
    assert out.read_text() == "keep me"


def test_backbone_name_leaving_the_bundle_is_refused_before_any_load(bundle, image, tmp_path, capsys, monkeypatch):
    outside = tmp_path / "outside" / "x.keras"
    shutil.copytree(bundle / "backbones", outside.parent)
    (outside.parent / "tiny.keras").rename(outside)
    edit_info(bundle, backbones=["../../outside/x"])
    opened = []
    monkeypatch.setattr(bundle_module, "load_model_file", lambda path, *a, **k: opened.append(path))
    code, error = run_cli(capsys, "predict", bundle, image)
    assert_one_line_error(code, error, "bundle.json", "../../outside/x")
    assert opened == []


def test_file_the_manifest_does_not_list_is_not_opened(bundle, image, capsys):
    shutil.copy(bundle / "backbones" / "tiny.keras", bundle / "extra.keras")
    edit_info(bundle, backbones=["tiny", "ghost"])
    code, error = run_cli(capsys, "predict", bundle, image)
    assert_one_line_error(code, error, "ghost.keras", "not listed")


def test_manifest_name_with_dot_dot_is_refused(bundle, image, capsys):
    manifest = json.loads((bundle / "manifest.json").read_text())
    rehash(bundle, {**manifest["files"], "backbones/../../x": "0" * 64})
    code, error = run_cli(capsys, "predict", bundle, image)
    assert_one_line_error(code, error, "manifest.json", "backbones/../../x")


@pytest.mark.parametrize("target", ["fusion.skops", "classifier.skops", "xgboost/0.ubj"])
def test_pickle_in_place_of_a_model_file_is_refused(bundle, image, capsys, target):
    (bundle / target).write_bytes(pickle.dumps({"never": "loaded"}))
    rehash(bundle)
    code, error = run_cli(capsys, "predict", bundle, image)
    assert_one_line_error(code, error, target)


def test_manifest_that_is_a_list_is_refused(bundle, image, capsys):
    (bundle / "manifest.json").write_text("[]")
    code, error = run_cli(capsys, "predict", bundle, image)
    assert_one_line_error(code, error, "manifest.json", "JSON object")


@pytest.mark.parametrize(
    ("key", "value"),
    [("threshold", "high"), ("image_size", "32"), ("class_names", "ab"), ("backbones", "tiny"), ("clahe", 1)],
)
def test_bundle_json_with_wrong_types_is_refused(bundle, image, capsys, key, value):
    edit_info(bundle, **{key: value})
    code, error = run_cli(capsys, "predict", bundle, image)
    assert_one_line_error(code, error, "bundle.json", key)


@pytest.fixture
def signed_bundle(saved_signed_bundle, tmp_path) -> Path:
    return shutil.copytree(saved_signed_bundle, tmp_path / "bundle")


def test_signature_is_hmac_sha256_of_the_manifest_bytes(signed_bundle):
    signature = json.loads((signed_bundle / "signature.json").read_text())
    expected = hmac.new(KEY.encode(), (signed_bundle / "manifest.json").read_bytes(), hashlib.sha256).hexdigest()
    assert signature == {"algorithm": "HMAC-SHA256", "signed_file": "manifest.json", "signature": expected}


def test_signed_bundle_loads_with_the_key(signed_bundle, image, capsys, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    code, error = run_cli(capsys, "predict", signed_bundle, image)
    verified = f"signed (HMAC-SHA256 of manifest.json verified with {KEY_ENV})"
    assert code == 0 and error.splitlines()[0] == f"tlfusion: bundle {signed_bundle}: {verified}"


@pytest.mark.parametrize("folder", ["saved_bundle", "signed_bundle"])
def test_without_a_key_a_bundle_loads_as_integrity_only(request, folder, image, capsys, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    code, error = run_cli(capsys, "predict", request.getfixturevalue(folder), image)
    assert code == 0 and "integrity only" in error and f"{KEY_ENV} not set" in error


def test_tampered_file_with_a_rehashed_manifest_is_refused_with_the_key(signed_bundle, image, capsys, monkeypatch):
    edit_info(signed_bundle, threshold=0.01)
    monkeypatch.setenv(KEY_ENV, KEY)
    code, error = run_cli(capsys, "predict", signed_bundle, image)
    assert_one_line_error(code, error, str(signed_bundle), "signature does not match")


def test_missing_signature_is_refused_with_the_key(signed_bundle, image, capsys, monkeypatch):
    (signed_bundle / "signature.json").unlink()
    monkeypatch.setenv(KEY_ENV, KEY)
    code, error = run_cli(capsys, "predict", signed_bundle, image)
    assert_one_line_error(code, error, str(signed_bundle), "not signed")


def test_wrong_key_is_refused(signed_bundle, image, capsys, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY.upper())
    code, error = run_cli(capsys, "predict", signed_bundle, image)
    assert_one_line_error(code, error, str(signed_bundle), "signature does not match")


def test_too_short_key_is_refused(signed_bundle, image, capsys, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "short")
    code, error = run_cli(capsys, "predict", signed_bundle, image)
    assert_one_line_error(code, error, KEY_ENV, "at least 16")
