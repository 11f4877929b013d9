"""Bad and odd inputs through the real `tlfusion` entry point: exit 2, one line naming the file or key, no hang,
nothing read outside the data root or the bundle's manifest, no leftovers; run-folder locking and crash leftovers."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import write_png, xray_like
from xgboost import XGBClassifier

from tlfusion import bundle as bundle_module
from tlfusion import pretraining
from tlfusion.backbones import build_backbone, feature_model, load_model_file
from tlfusion.bundle import Bundle, save_bundle
from tlfusion.classifiers import fusion_pipeline
from tlfusion.cli import main
from tlfusion.config import load_experiment
from tlfusion.data import images
from tlfusion.data.images import file_sha256
from tlfusion.data.sources import read_chestxray14
from tlfusion.errors import InputError
from tlfusion.feature_runners import ModelSource
from tlfusion.features import FeatureFusion
from tlfusion.fileio import locked
from tlfusion.onnx_graphs import cached_onnx_graph, onnx_cache_path, onnx_runner, read_cached_onnx
from tlfusion.pipeline import Pipeline
from tlfusion.runfiles import check_keras_file
from tlfusion.signing import KEY_ENV
from tlfusion.stages import REGISTRY

SIZE = 32


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: a blocked open() or read() is interrupted by SIGALRM."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s (blocked on a FIFO?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """`tlfusion ARGV` in-process: (exit code, stderr)."""
    capsys.readouterr()
    with deadline(120):
        code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def assert_one_line_error(code: int, error: str, *names: str) -> None:
    lines = error.splitlines()
    assert code == 2, error
    assert len(lines) == 1 and lines[0].startswith("tlfusion: error: "), error
    for name in names:
        assert name in lines[0], (name, lines[0])


def experiment_file(folder: Path, data: dict, text: str | None = None) -> Path:
    raw = {
        "name": "hard",
        "positive_class": "abnormal",
        "data": data,
        "split": {"test_fraction": 0.25, "val_fraction": 0.25},
        "image": {"size": SIZE},
        "backbones": [{"name": "mobilenetv2", "options": {"alpha": 0.35}}],
        "finetune": {"enabled": False},
        "features": {"engine": "keras"},
    }
    path = folder / "hard.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(raw))
    return path


@pytest.fixture
def experiment(tmp_path, folder_dataset) -> Path:
    return experiment_file(tmp_path, {"format": "folder", "root": str(folder_dataset)})


# ----------------------------------------------------------------------------- non-regular files


@pytest.fixture
def odd_entries(folder_dataset) -> list[str]:
    """A FIFO, a folder and a dangling link, each named like an image, inside the data set."""
    normal = folder_dataset / "normal"
    os.mkfifo(normal / "pipe.png")
    (normal / "folder.png").mkdir()
    (normal / "gone.png").symlink_to(normal / "deleted.png")
    return ["pipe.png", "folder.png", "gone.png"]


def test_data_set_fifo_folder_and_dangling_link_are_named_never_read(tmp_path, experiment, odd_entries, capsys):
    code, error = run_cli(capsys, "finetune", experiment, "--out", tmp_path / "a")
    assert_one_line_error(code, error, "folder.png", "not a regular file (a folder)")
    code, _ = run_cli(capsys, "finetune", experiment, "--out", tmp_path / "b", "--skip-bad")
    assert code == 0
    skipped = json.loads((tmp_path / "b" / "data" / "skipped.json").read_text())
    reasons = {Path(row["path"]).name: row["reason"] for row in skipped}
    assert set(reasons) == set(odd_entries)
    assert "a FIFO" in reasons["pipe.png"] and "No such file" in reasons["gone.png"]
    summary = json.loads((tmp_path / "b" / "data" / "summary.json").read_text())
    assert summary["images"] == 24


# ----------------------------------------------------------------------------- data root


@pytest.fixture
def outside_image(tmp_path) -> Path:
    return write_png(tmp_path / "outside" / "secret.png", xray_like(7))


def test_folder_data_does_not_follow_links_out_of_the_root_unless_asked(
    tmp_path, experiment, folder_dataset, outside_image, capsys
):
    (folder_dataset / "normal" / "linked.png").symlink_to(outside_image)
    code, error = run_cli(capsys, "data", experiment)
    assert_one_line_error(code, error, "linked.png", "data.follow_symlinks")
    capsys.readouterr()
    assert main(["data", str(experiment), "--set", "data.follow_symlinks=true"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 25


def test_followed_link_is_named_by_its_data_set_path(tmp_path, folder_dataset, outside_image, capsys):
    (folder_dataset / "normal" / "linked.png").symlink_to(outside_image)
    experiment = experiment_file(tmp_path, {"format": "folder", "root": str(folder_dataset), "follow_symlinks": True})
    assert main(["finetune", str(experiment), "--out", str(tmp_path / "run")]) == 0
    table = (tmp_path / "run" / "data" / "table.csv").read_text()
    assert str(folder_dataset / "normal" / "linked.png") in table and str(outside_image) not in table


def test_linked_class_folder_out_of_the_root_is_refused(tmp_path, experiment, folder_dataset, outside_image, capsys):
    (folder_dataset / "other").symlink_to(outside_image.parent, target_is_directory=True)
    code, error = run_cli(capsys, "data", experiment)
    assert_one_line_error(code, error, "other", "links outside the data root")


def test_csv_data_follows_the_same_rule(tmp_path, folder_dataset, outside_image, capsys):
    (folder_dataset / "linked.png").symlink_to(outside_image)
    rows = [f"normal/img{i}.png,normal" for i in range(4)] + [f"abnormal/img{i}.png,abnormal" for i in range(4)]
    (folder_dataset / "labels.csv").write_text("path,label\n" + "\n".join([*rows, "linked.png,normal"]) + "\n")
    data = {"format": "csv", "root": str(folder_dataset), "csv": "labels.csv"}
    experiment = experiment_file(tmp_path, data)
    code, error = run_cli(capsys, "data", experiment)
    assert_one_line_error(code, error, "labels.csv", "linked.png", "data.follow_symlinks")
    assert run_cli(capsys, "data", experiment, "--set", "data.follow_symlinks=true")[0] == 0


# ----------------------------------------------------------------------------- experiment files and --set


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), "not a UTF-8 text file"),
        ("name: caf\xe9\n".encode("latin-1"), "not a UTF-8 text file"),
        (b"name: a\npositive_class: b\nname: c\n", "duplicate key 'name' at line 3"),
    ],
    ids=["elf", "latin-1", "duplicate-key"],
)
def test_unreadable_experiment_file_exits_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    code, error = run_cli(capsys, "data", path)
    assert_one_line_error(code, error, "bad.yaml", message)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("finetune.epochs=[1", "--set finetune.epochs"),
        ("name=!!python/object/apply:os.system [echo owned]", "--set name"),
        ("split={test_fraction: 0.1, test_fraction: 0.2}", "duplicate key 'test_fraction'"),
    ],
    ids=["invalid-yaml", "python-tag", "duplicate-key"],
)
def test_bad_set_value_exits_2(experiment, capsys, override, key):
    code, error = run_cli(capsys, "data", experiment, "--set", override)
    assert_one_line_error(code, error, key)


def png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header declares `width` x `height` 8-bit grayscale pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * min(height, 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def dicom_declaring(path: Path, rows: int, columns: int) -> Path:
    """A DICOM file declaring `rows` x `columns` 8-bit pixels, with four bytes of pixel data."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.Rows, dataset.Columns, dataset.PhotometricInterpretation = rows, columns, "MONOCHROME2"
    dataset.SamplesPerPixel, dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 1, 8, 8, 7
    dataset.PixelRepresentation, dataset.PixelData = 0, bytes(4)
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("size", [(30000, 30000), (40000, 40000), (100, 10_000_000)])
def test_decompression_bomb_is_refused_before_it_is_decoded(tmp_path, monkeypatch, size):
    """30000 x 30000 passes OpenCV's own limit (2^30 pixels) and used to be decoded (900 MB) before it was refused."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(*size))
    assert bomb.stat().st_size < 100_000
    monkeypatch.setattr(images.cv2, "imdecode", lambda *_: pytest.fail("decoded before the size check"))
    with pytest.raises(InputError, match=re.escape(f"{bomb}: image too large ({size[0]}x{size[1]} declared")):
        images.read_gray(bomb)


def test_dicom_bomb_is_refused_before_its_pixels_are_decoded(tmp_path):
    bomb = dicom_declaring(tmp_path / "bomb.dcm", 60000, 60000)
    with pytest.raises(InputError, match=re.escape(f"{bomb}: image too large (60000x60000 declared")):
        images.read_gray(bomb)


def test_decompression_bomb_exits_2_in_one_line_or_is_skipped_with_the_reason(
    tmp_path, experiment, folder_dataset, capsys
):
    bomb = folder_dataset / "normal" / "bomb.png"
    bomb.write_bytes(png_declaring(30000, 30000))
    code, error = run_cli(capsys, "finetune", experiment, "--out", tmp_path / "a")
    assert_one_line_error(code, error, "bomb.png", "image too large (30000x30000 declared")
    code, _ = run_cli(capsys, "finetune", experiment, "--out", tmp_path / "run", "--skip-bad")
    skipped = json.loads((tmp_path / "run" / "data" / "skipped.json").read_text())
    assert code == 0 and [(Path(row["path"]).name, "too large" in row["reason"]) for row in skipped] == [
        ("bomb.png", True)
    ]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"GIF89a" + bytes(64), "not a PNG, JPEG, BMP, TIFF or DICOM file"),
        (b"\x89PNG\r\n\x1a\n\0\0", "not a PNG, JPEG, BMP, TIFF or DICOM file, or its header is cut short"),
        (png_declaring(64, 64)[:60], "truncated or unsupported"),
    ],
    ids=["gif", "cut-header", "cut-data"],
)
def test_unsupported_or_truncated_image_is_named(tmp_path, content, reason):
    path = tmp_path / "odd.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(f"{path}: cannot decode image")) as error:
        images.read_gray(path)
    assert reason in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- bundles and predict


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


# ----------------------------------------------------------------------------- bundle signatures


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


# ----------------------------------------------------------------------------- run folders


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


def test_mura_labels_csv_that_is_a_fifo_is_not_read(tmp_path, mura_tree, capsys):
    labels = mura_tree / "valid_labeled_studies.csv"
    labels.unlink()
    os.mkfifo(labels)
    data = {"format": "mura", "root": str(mura_tree)}
    code, error = run_cli(capsys, "data", experiment_file(tmp_path, data))
    assert_one_line_error(code, error, "valid_labeled_studies.csv", "not a regular file")


@pytest.fixture
def chestxray14_csv(tmp_path) -> Path:
    """Two images with a Data_Entry_2017.csv and both official split lists beside it."""
    names = ["00000001_000.png", "00000002_000.png"]
    for i, name in enumerate(names):
        write_png(tmp_path / "nih" / "images" / name, xray_like(i, 16))
    rows = "".join(f"{name},Mass,{i}\n" for i, name in enumerate(names))
    (tmp_path / "nih" / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,Patient ID\n" + rows)
    (tmp_path / "nih" / "train_val_list.txt").write_text(names[0] + "\n")
    (tmp_path / "nih" / "test_list.txt").write_text(names[1] + "\n")
    return tmp_path / "nih" / "Data_Entry_2017.csv"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (os.mkfifo, "not a regular file (a FIFO)"),
        (os.mkdir, "not a regular file (a folder)"),
        (lambda path: path.symlink_to(path.parent / "gone.txt"), "cannot read"),
        (lambda path: path.write_bytes(b"caf\xe9\n"), "not a UTF-8 text file"),
        (lambda path: None, "missing beside train_val_list.txt"),
    ],
    ids=["fifo", "folder", "dangling-link", "latin-1", "missing"],
)
def test_chestxray14_split_list_that_cannot_be_read_is_refused_by_name(chestxray14_csv, damage, message):
    test_list = chestxray14_csv.parent / "test_list.txt"
    test_list.unlink()
    damage(test_list)
    with deadline(30), pytest.raises(InputError, match=re.escape(f"{test_list}: {message}")):
        read_chestxray14(chestxray14_csv)
    assert read_chestxray14(chestxray14_csv, split_lists=False)["split"].tolist() == ["", ""]


# ----------------------------------------------------------------------------- damaged caches and models


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


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


@pytest.fixture
def resume_folder(tmp_path) -> tuple[Path, pd.DataFrame]:
    """An interrupted pretraining's folder (state after epoch 1, a checkpoint) and its table."""
    rows = [
        [
            str(write_png(tmp_path / "images" / f"{i}.png", xray_like(i, 32))),
            f"c{i % 2}",
            f"p{i}",
            "train" if i < 6 else "val",
        ]
        for i in range(8)
    ]
    table = pd.DataFrame(rows, columns=["path", "label", "patient", "split"])
    out = tmp_path / "pretrain"
    out.mkdir()
    build_backbone("mobilenetv2", SIZE, alpha=0.35).save(out / "checkpoint.keras")
    state = {"epoch": 1, "phase": "all", "best": 1.0, "best_epoch": 1, "wait": 0, "stopped": False}
    state |= {"wall_seconds": 1.0, "history": [], "task": ["pretrain", "mobilenetv2", 2]}
    (out / "state.json").write_text(json.dumps(state))
    return out, table


@pytest.mark.parametrize(
    ("damaged", "message"),
    [("state.json", "unreadable JSON"), ("checkpoint.keras", "not a complete Keras model file")],
)
def test_resuming_from_a_damaged_checkpoint_names_the_file(resume_folder, damaged, message):
    out, table = resume_folder
    truncate(out / damaged)
    with pytest.raises(InputError, match=re.escape(f"{out / damaged}: {message}")):
        pretraining.pretrain(
            table,
            "mobilenetv2",
            out,
            epochs=2,
            resume=True,
            image_size=SIZE,
            batch_size=4,
            options={"alpha": 0.35},
            verbose=0,
        )
