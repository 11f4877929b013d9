"""DICOM files: recognised by their preamble, decoded as they are displayed, and the header's ids read.

A DICOM file (Part 10) holds 128 bytes of preamble then `DICM`, which marks it whatever its name: PACS exports often
have no suffix, or a UID for a name. Its pixels go through the modality LUT (rescale slope and intercept) and the VOI
LUT (window), as a viewer shows them. 8-bit data that neither LUT changes keep their values, as an 8-bit PNG does;
anything else is scaled by `images` as a 16-bit PNG is. MONOCHROME1, or a Presentation LUT Shape of INVERSE, is
inverted (once: the DX IOD pairs the two, both saying that the lowest value is white). Compressed pixel data is
decoded by pydicom's plugins (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg: JPEG, JPEG-LS, JPEG 2000; RLE
natively); a transfer syntax no installed plugin decodes is refused in one line naming the file.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from tlfusion.data.image_header import check_size
from tlfusion.errors import InputError

PREAMBLE = 128
MAGIC = b"DICM"
HEADER_FIELDS = {"PatientID": "patient", "StudyInstanceUID": "study", "ViewPosition": "view", "BodyPartExamined": ""}
"""Header keyword -> the data-table column it fills (BodyPartExamined fills `region`, lower-cased, where empty)."""
_DECODERS = "pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg (installed with tlfusion)"


def is_dicom(data: bytes) -> bool:
    """Whether `data` starts like a DICOM file: a 128-byte preamble, then `DICM`."""
    return data[PREAMBLE : PREAMBLE + len(MAGIC)] == MAGIC


def is_dicom_file(path: str | Path) -> bool:
    """Whether `path` is a regular file that starts like a DICOM file (only its first 132 bytes are read; a folder,
    FIFO, device or unreadable file is not one)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as file:
            return is_dicom(file.read(PREAMBLE + len(MAGIC)))
    except OSError:
        return False


def dicom_pixels(path: Path, data: bytes) -> tuple[np.ndarray, bool]:
    """(the first frame's 2-D pixels after the modality and VOI LUTs, whether they are to be inverted) of a DICOM
    file's bytes; its declared size is checked before its pixel data is decoded."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = pydicom.dcmread(io.BytesIO(data), force=not is_dicom(data))
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    check_size(path, int(dataset.Columns), int(dataset.Rows) * frames)
    _check_decoder(path, dataset)
    dataset.pixel_array_options(index=0 if frames > 1 else None)
    raw = dataset.pixel_array
    if int(getattr(dataset, "SamplesPerPixel", 1)) > 1:  # colour (YBR is converted to RGB by pydicom)
        raw = cv2.cvtColor(np.ascontiguousarray(raw), cv2.COLOR_RGB2GRAY)
    pixels = apply_voi_lut(apply_modality_lut(raw, dataset), dataset)
    if raw.dtype == np.uint8 and int(getattr(dataset, "BitsStored", 8)) == 8 and np.array_equal(pixels, raw):
        pixels = raw  # 8-bit values no LUT changed: kept as they are
    else:
        pixels = np.asarray(pixels, dtype=np.float32)
    inverse = getattr(dataset, "PresentationLUTShape", "") == "INVERSE"
    return pixels, inverse or getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1"


def _check_decoder(path: Path, dataset) -> None:
    """InputError naming `path` when its pixel data is compressed in a transfer syntax no installed plugin decodes."""
    from pydicom.pixels import get_decoder

    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise InputError(
            f"{path}: DICOM pixel data compressed as {syntax.name} ({syntax}), which no installed decoder reads "
            f"(JPEG, JPEG-LS, JPEG 2000 and RLE are read with {_DECODERS})"
        )


def header_fields(path: str | Path) -> dict[str, str]:
    """The `HEADER_FIELDS` a DICOM file's header holds, as stripped text ({} for any other file, or a header
    pydicom cannot read: decoding refuses that file by name later)."""
    if not is_dicom_file(path):
        return {}
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_FIELDS))
    except Exception:  # a damaged header: the image is refused, with its reason, when it is decoded
        return {}
    return {key: str(dataset.get(key, "") or "").strip() for key in HEADER_FIELDS if dataset.get(key, "")}


def with_dicom_header(table: pd.DataFrame, patients: bool, studies: bool) -> pd.DataFrame:
    """`table` with its DICOM files' header fields: `view` (ViewPosition) as a column when any file has one,
    `region` (BodyPartExamined, lower-cased) where empty and, when the source gave none (`patients`, `studies`),
    `patient` (PatientID) and `study` (StudyInstanceUID). Images without them keep what they had."""
    headers = [header_fields(path) for path in table["path"]]
    if not any(headers):
        return table
    table = table.copy()
    header = pd.DataFrame(headers, index=table.index, columns=list(HEADER_FIELDS)).fillna("")
    part = header["BodyPartExamined"].str.lower()
    table["region"] = table["region"].where(table["region"] != "", part)
    for keyword, wanted in (("PatientID", patients), ("StudyInstanceUID", studies)):
        column = HEADER_FIELDS[keyword]
        if wanted:
            table[column] = header[keyword].where(header[keyword] != "", table[column])
    if (header["ViewPosition"] != "").any():
        known = table["view"] if "view" in table.columns else ""
        table["view"] = header["ViewPosition"].where(header["ViewPosition"] != "", known)
    return table
