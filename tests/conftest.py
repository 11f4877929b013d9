"""Shared fixtures: tiny images and layout-faithful dataset trees written to tmp_path."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)
    return path


def xray_like(seed: int, size: int = 48, bright_blob: bool = False) -> np.ndarray:
    """A smooth grayscale 'radiograph' (uint8); with `bright_blob`, a bright disc in the upper-left quarter."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(40, 120, (size, size)).astype(np.uint8), (7, 7), 0)
    if bright_blob:
        cv2.circle(image, (size // 4, size // 4), max(2, size // 8), 250, -1)
    return image


def write_folder_dataset(root: Path) -> Path:
    """`root/<class>/imgN.png`, 12 images per class, the positive class with a bright blob."""
    for label, blob in (("normal", False), ("abnormal", True)):
        for i in range(12):
            write_png(root / label / f"img{i}.png", xray_like(i + (100 if blob else 0), bright_blob=blob))
    return root


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    return write_folder_dataset(tmp_path / "folder")


@pytest.fixture
def mura_tree(tmp_path: Path) -> Path:
    """A MURA-v1.1-shaped tree (two regions, train/valid) with its labeled_studies CSVs."""
    root = tmp_path / "MURA-v1.1"
    rows: dict[str, list[str]] = {"train": [], "valid": []}
    for split, first in (("train", 1), ("valid", 50)):
        for region in ("XR_HUMERUS", "XR_WRIST"):
            for patient in range(first, first + 6):
                for study, label in ((1, "positive"), (2, "negative")):
                    study_dir = root / split / region / f"patient{patient:05d}" / f"study{study}_{label}"
                    for image in range(2):
                        write_png(
                            study_dir / f"image{image + 1}.png",
                            xray_like(patient * 10 + image, 32, label == "positive"),
                        )
                    rows[split].append(f"MURA-v1.1/{study_dir.relative_to(root)}/,{int(label == 'positive')}")
    for split, lines in rows.items():
        (root / f"{split}_labeled_studies.csv").write_text("\n".join(lines) + "\n")
    return root


def write_dicom(
    path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", syntax: str | None = None, **header
) -> Path:
    """A DX DICOM file of `pixels` (uint8: 8-bit, uint16: 12 bits stored in 16) written with pydicom, uncompressed or
    compressed by pydicom in transfer syntax `syntax`; `header` sets further keywords (PatientID=..., ...)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.PhotometricInterpretation = "DX", photometric
    dataset.Rows, dataset.Columns = pixels.shape
    bits = 8 if pixels.dtype == np.uint8 else 16
    dataset.SamplesPerPixel, dataset.BitsAllocated, dataset.PixelRepresentation = 1, bits, 0
    dataset.BitsStored, dataset.HighBit = (8, 7) if bits == 8 else (12, 11)
    dataset.PixelData = pixels.tobytes()
    for keyword, value in header.items():
        setattr(dataset, keyword, value)
    if syntax is not None:
        dataset.compress(syntax)
    dataset.save_as(path, enforce_file_format=True)
    return path


# --- the real `tlfusion` entry point on bad input (the *_hardening tests) ---------------------------------

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
    from tlfusion.cli import main

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


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
