"""DICOM as a PACS exports it: found by its preamble, decoded as displayed, its header's ids in the data table."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, RLELossless

from tests.bundle.test_bundle_hardening import tiny_bundle  # noqa: F401 (fixture)
from tests.conftest import write_dicom, write_png, xray_like
from tlfusion.cli import main
from tlfusion.config.experiment import DataSpec
from tlfusion.data import images, sources
from tlfusion.data.splits import assign_splits
from tlfusion.errors import InputError


def ramp16(seed: int = 0) -> np.ndarray:
    """12-bit values in a 16-bit array: what a DX detector writes."""
    return (xray_like(seed, 40).astype(np.uint16) * 16 + 7).astype(np.uint16)


def png16(path: Path, pixels: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), pixels.astype(np.uint16))
    return path


def test_dicom_without_a_suffix_is_read_by_its_preamble(tmp_path):
    pixels = xray_like(1, 40)
    dicom = write_dicom(tmp_path / "1.2.840.113619.2.55.3", pixels)  # a UID as the name: suffix ".3"
    no_suffix = write_dicom(tmp_path / "IM000001", pixels)
    twin = images.read_gray(write_png(tmp_path / "twin.png", pixels))
    np.testing.assert_array_equal(images.read_gray(dicom), twin)  # 8-bit: values kept, like the PNG
    np.testing.assert_array_equal(images.read_gray(no_suffix), twin)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_16_bit_dicom_reads_like_its_16_bit_png_twin(tmp_path, photometric):
    raw = ramp16()
    shown = raw if photometric == "MONOCHROME2" else 4095 - raw  # MONOCHROME1: the lowest value is white
    dicom = images.read_gray(write_dicom(tmp_path / "x", raw, photometric))
    np.testing.assert_allclose(dicom, images.read_gray(png16(tmp_path / "twin.png", shown)), atol=1e-3)


def test_presentation_lut_inverse_is_inverted_once(tmp_path):
    pixels = xray_like(2, 40)
    plain = images.read_gray(write_dicom(tmp_path / "plain", pixels))
    inverse = images.read_gray(write_dicom(tmp_path / "inverse", pixels, PresentationLUTShape="INVERSE"))
    both = images.read_gray(write_dicom(tmp_path / "both", pixels, "MONOCHROME1", PresentationLUTShape="INVERSE"))
    np.testing.assert_array_equal(inverse, 255 - plain)
    np.testing.assert_array_equal(both, inverse)  # the DX pairing: one inversion, not two


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_dicom_decodes_like_the_uncompressed_one(tmp_path, syntax):
    raw = ramp16(3)
    compressed = write_dicom(tmp_path / "compressed", raw, syntax=syntax)
    expected = images.read_gray(write_dicom(tmp_path / "plain", raw))
    np.testing.assert_array_equal(images.read_gray(compressed), expected)


def test_a_transfer_syntax_no_decoder_reads_is_one_clear_error(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate

    path = write_dicom(tmp_path / "video", xray_like(4, 40))
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = MPEG2MPML
    dataset.PixelData = encapsulate([bytes(64)])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(InputError, match=f"^{path}: DICOM pixel data compressed as MPEG2") as error:
        images.read_gray(path)
    assert "\n" not in str(error.value)


def test_a_folder_of_dicoms_is_grouped_by_the_header_patient_id(tmp_path):
    root = tmp_path / "pacs"
    for label, offset in (("normal", 0), ("fracture", 100)):
        for patient in range(4):
            for view in ("PA", "LL"):
                name = root / label / f"{patient}{view}"  # no suffix, no patient in the name
                write_dicom(
                    name,
                    xray_like(offset + patient * 2 + (view == "LL"), 32),
                    PatientID=f"{label}-{patient}",
                    StudyInstanceUID=f"1.2.3.{offset + patient}",
                    ViewPosition=view,
                    BodyPartExamined="HAND",
                )
    (root / "normal" / "notes").write_text("not an image")  # a file without suffix that is no DICOM
    table = sources.read_source(DataSpec(format="folder", root=str(root)))
    assert len(table) == 16 and table["patient"].nunique() == 8
    assert all(sorted(views) == ["LL", "PA"] for _, views in table.groupby("patient")["view"])
    assert set(table["region"]) == {"hand"} and table["study"].nunique() == 8
    split = assign_splits(table, 0.25, 0.25, "patient", 0)
    assert split.groupby("patient")["split"].nunique().eq(1).all()  # a patient's two views stay in one split


def test_a_dicom_link_out_of_the_root_is_not_read(tmp_path):
    outside = write_dicom(tmp_path / "outside" / "secret", xray_like(5, 32))
    root = tmp_path / "root"
    write_dicom(root / "a" / "inside", xray_like(6, 32))
    os.symlink(outside, root / "a" / "linked")
    assert [path.name for path in sources.image_files(root)] == ["inside"]


def test_dicoms_predict_like_their_png_twins(tiny_bundle, tmp_path):  # noqa: F811 (fixture)
    eight, sixteen = xray_like(7, 40), ramp16(8)
    twins = [write_png(tmp_path / "png" / "a.png", eight), png16(tmp_path / "png" / "b.png", sixteen)]
    twins.append(png16(tmp_path / "png" / "c.png", 4095 - sixteen))
    dicoms = [write_dicom(tmp_path / "dcm" / "a", eight), write_dicom(tmp_path / "dcm" / "b", sixteen)]
    dicoms.append(write_dicom(tmp_path / "dcm" / "c", sixteen, "MONOCHROME1"))
    np.testing.assert_allclose(tiny_bundle.predict_paths(dicoms), tiny_bundle.predict_paths(twins), atol=1e-6)


def test_predict_on_a_folder_without_images_names_it(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    code = main(["predict", str(tmp_path / "no-bundle"), str(empty)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1
    assert error[0].startswith(f"tlfusion: error: {empty}: no images in this folder")
