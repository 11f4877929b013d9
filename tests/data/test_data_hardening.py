"""Bad and odd data through the real `tlfusion` entry point: FIFOs, links out of the data root, image bombs, truncated
files, unreadable label lists: exit 2, one line naming the file, no hang."""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, deadline, experiment_file, run_cli, write_png, xray_like
from tlfusion.cli import main
from tlfusion.data import images
from tlfusion.data.findings import read_chestxray14
from tlfusion.errors import InputError


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
