"""The pixel size an image file declares in its header, read without decoding anything.

`tlfusion.data.images.read_gray` checks it before it decodes: a decompression bomb (a small file declaring a huge
image) is refused before the decoder allocates its pixels.
"""

from __future__ import annotations

import struct
from pathlib import Path

from tlfusion.errors import InputError

FORMATS = "PNG, JPEG, BMP or TIFF"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length: TEM, RST0-7
_TIFF_ORDER = {b"II": "<", b"MM": ">"}
_TIFF_WIDTH, _TIFF_HEIGHT = 256, 257
_TIFF_INTEGERS = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8
MAX_PIXELS = 100_000_000
"""Largest image read (width x height, per frame): a radiograph has under 50 million pixels. Checked against the
file's header before decoding, so a decompression bomb costs no memory."""


def check_size(path: Path, width: int, height: int) -> None:
    """InputError unless the declared `width` x `height` is within `MAX_PIXELS` (checked before decoding)."""
    if width * height > MAX_PIXELS:
        limit = f"over {MAX_PIXELS // 1_000_000} million pixels"
        raise InputError(f"{path}: image too large ({width}x{height} declared, {limit}); not decoded")


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) declared by a PNG, JPEG, BMP or TIFF (first page) file's header; None for any other
    content or a header cut short."""
    readers = {b"\x89P": _png, b"\xff\xd8": _jpeg, b"BM": _bmp, b"II": _tiff, b"MM": _tiff}
    reader = readers.get(data[:2])
    try:
        return None if reader is None else reader(data)
    except (struct.error, IndexError):
        return None


def _png(data: bytes) -> tuple[int, int] | None:
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def _jpeg(data: bytes) -> tuple[int, int] | None:
    """The first frame header's size, walking the marker segments that precede it."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker in _JPEG_STANDALONE:
            at += 2
        elif marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return width, height
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        else:
            at += 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
    return None


def _bmp(data: bytes) -> tuple[int, int]:
    header_size = struct.unpack("<I", data[14:18])[0]
    if header_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)  # a negative height is a top-down bitmap


def _tiff(data: bytes) -> tuple[int, int] | None:
    """ImageWidth and ImageLength of the first image file directory (classic TIFF or BigTIFF)."""
    order = _TIFF_ORDER[data[:2]]
    magic = struct.unpack(order + "H", data[2:4])[0]
    if magic == 42:
        offset, count_format, entry_size = "I", "H", 12
        directory = struct.unpack(order + "I", data[4:8])[0]
    elif magic == 43:
        offset, count_format, entry_size = "Q", "Q", 20
        directory = struct.unpack(order + "Q", data[8:16])[0]
    else:
        return None
    first = directory + struct.calcsize(count_format)
    (count,) = struct.unpack(order + count_format, data[directory:first])
    found = {}
    for entry in range(first, first + count * entry_size, entry_size):
        tag, kind = struct.unpack(order + "HH", data[entry : entry + 4])
        if tag in (_TIFF_WIDTH, _TIFF_HEIGHT) and kind in _TIFF_INTEGERS:
            value = entry + 4 + struct.calcsize(offset)
            found[tag] = struct.unpack_from(order + _TIFF_INTEGERS[kind], data, value)[0]
    return (found[_TIFF_WIDTH], found[_TIFF_HEIGHT]) if len(found) == 2 else None
