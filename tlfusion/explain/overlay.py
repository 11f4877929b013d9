"""Explanation images: maps computed on the letterboxed square model input, drawn on the original radiograph.

`data.images.resize_pad` letterboxes every image into a square; `crop_to_original` undoes it (crop the padding,
resize to the original shape), so overlays keep the radiograph's true aspect. PNGs are written atomically.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from matplotlib.figure import Figure
from skimage.segmentation import mark_boundaries

from tlfusion.data.images import resize_pad
from tlfusion.errors import InputError
from tlfusion.fileio import write_atomic

FIGURE_INCHES = 4.0
DPI = 100
POSITIVE_COLOUR = (0.0, 1.0, 0.0)
NEGATIVE_COLOUR = (1.0, 0.0, 0.0)


def crop_to_original(square: np.ndarray, original_shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Undo `resize_pad`: crop a [s, s] map to the image area and resize it to `original_shape` (height, width)."""
    height, width = original_shape[:2]
    inside = resize_pad(np.ones((height, width), np.float32), square.shape[0]) > 0.5
    rows, columns = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    cropped = square[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(cropped, (width, height), interpolation=interpolation)


def _as_gray(image: np.ndarray) -> np.ndarray:
    gray = np.asarray(image, np.float32)
    gray = gray[..., 0] if gray.ndim == 3 else gray
    if gray.ndim != 2:
        raise InputError(f"expected a grayscale image, got shape {np.shape(image)}")
    return gray


def _figure(gray: np.ndarray, title: str) -> tuple[Figure, object]:
    height, width = gray.shape
    scale = FIGURE_INCHES / max(height, width)
    figure = Figure(figsize=(width * scale + 1.0, height * scale + 0.5), dpi=DPI)
    axes = figure.subplots()
    axes.set_axis_off()
    axes.set_title(title, fontsize=9)
    return figure, axes


def _save_figure(figure: Figure, path: str | Path) -> Path:
    return write_atomic(path, lambda temporary: figure.savefig(temporary, format="png", bbox_inches="tight"))


def save_image(image: np.ndarray, path: str | Path) -> Path:
    """The radiograph itself as an 8-bit grayscale PNG."""
    ok, encoded = cv2.imencode(".png", np.clip(_as_gray(image), 0, 255).astype(np.uint8))
    if not ok:
        raise InputError(f"{path}: could not encode PNG")
    return write_atomic(path, lambda temporary: temporary.write_bytes(encoded.tobytes()))


def save_heatmap_overlay(
    image: np.ndarray, heatmap: np.ndarray, path: str | Path, title: str = "", alpha: float = 0.4
) -> Path:
    """Draw a [0, 1] map computed on the square model input over the original `image`, with a colour bar."""
    gray = _as_gray(image)
    figure, axes = _figure(gray, title)
    axes.imshow(gray, cmap="gray", vmin=0, vmax=255)
    shown = axes.imshow(crop_to_original(heatmap, gray.shape), cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.03)
    return _save_figure(figure, path)


def save_lime_overlay(image: np.ndarray, lime_map, path: str | Path, title: str = "") -> Path:
    """Outline, on the original `image`, the top superpixels of a `LimeMap` that support (green) and oppose (red)
    the positive class."""
    gray = _as_gray(image)
    rgb = np.repeat(np.clip(gray, 0, 255)[..., None] / 255.0, 3, axis=-1)
    for mask, colour in ((lime_map.positive_mask, POSITIVE_COLOUR), (lime_map.negative_mask, NEGATIVE_COLOUR)):
        chosen = np.where(mask, lime_map.segments + 1, 0).astype(np.int32)
        rgb = mark_boundaries(rgb, crop_to_original(chosen, gray.shape, nearest=True), color=colour, mode="thick")
    figure, axes = _figure(gray, title)
    axes.imshow(rgb)
    return _save_figure(figure, path)
