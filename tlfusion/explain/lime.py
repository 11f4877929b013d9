"""LIME on a whole fitted bundle: superpixels of the radiograph switched off, the fused classifier re-queried.

The grayscale image is widened to RGB for LIME and narrowed back inside the classifier function, which sends
large batches to `bundle.predict_proba`. Superpixels come from SLIC, computed once per image; every image gets
a fresh explainer seeded with `seed`, so a result does not depend on which images were explained before it.

Radiographs sit on a dark background (air, the black letterbox padding) that touches the image border. Filling a
background superpixel with the image's mean paints a grey patch no training image had, and LIME used to credit the
borders with the change. That background (`dark_background`) is therefore one segment of its own that is never
switched off (the classifier function restores it), gets weight 0 and is never outlined; the superpixels cover
the anatomy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from lime.lime_image import LimeImageExplainer
from scipy import ndimage
from skimage.segmentation import slic

from tlfusion.errors import InputError

POSITIVE = 1
BACKGROUND_LEVEL = 0.08  # of the intensity range above the darkest percentile: darker border-connected pixels
BACKGROUND_CEILING = 40.0  # and never brighter than this (of 255): an image without dark air has no background


@dataclass(frozen=True)
class LimeMap:
    """One image's LIME explanation of the positive class.

    `weights` [s, s]: each pixel carries its superpixel's weight (> 0 supports the positive class, < 0 opposes it);
    `segments` [s, s]: superpixel ids; `background` [s, s] bool: the background segment, never switched off
    (weight 0); `positive_mask` / `negative_mask` [s, s] bool: the top-k anatomy superpixels that
    support / oppose it most; `score`: R^2 of LIME's local linear model.
    """

    weights: np.ndarray
    segments: np.ndarray
    background: np.ndarray
    positive_mask: np.ndarray
    negative_mask: np.ndarray
    score: float


def dark_background(image: np.ndarray) -> np.ndarray:
    """The image's background [s, s] bool: pixels darker than `BACKGROUND_LEVEL` of its intensity range and than
    `BACKGROUND_CEILING` (after a 5x5 median filter against noise), connected to its border. All False when that
    would be the whole image. (FracAtlas hands: 18-57 % of the image, mean intensity 0-9; Kermany chests: 16-30 %,
    mostly the letterbox padding.)"""
    gray = ndimage.median_filter(np.asarray(image, np.float32).reshape(image.shape[0], image.shape[1]), size=5)
    low, high = np.percentile(gray, [1, 99])
    regions, _ = ndimage.label(gray <= min(low + BACKGROUND_LEVEL * (high - low), BACKGROUND_CEILING))
    edge = np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]])
    background = np.isin(regions, np.unique(edge[edge > 0]))
    return np.zeros_like(background) if background.all() else background


def radiograph_segments(
    image: np.ndarray, n_segments: int = 50, compactness: float = 10.0, background: np.ndarray | None = None
) -> np.ndarray:
    """SLIC superpixels [s, s] (ids 0..k-1) of a grayscale [0, 255] image [s, s, 1], on its RGB (CIELAB) copy.
    With a `background` mask, the anatomy outside it gets the `n_segments` and the background is the one segment 0.

    On a gray image CIELAB's L channel spans 0-100, for which a compactness near 10 gives regular regions that
    still follow bone and soft-tissue edges.
    """
    rgb = np.repeat(np.asarray(image, np.float64).reshape(image.shape[0], image.shape[1], 1) / 255.0, 3, axis=-1)
    anatomy = None if background is None or not background.any() else ~background
    segments = slic(
        rgb, n_segments=n_segments, compactness=compactness, sigma=1.0, start_label=1, channel_axis=-1, mask=anatomy
    )
    return np.unique(segments, return_inverse=True)[1].reshape(segments.shape)


def _classifier_fn(bundle, image: np.ndarray, background: np.ndarray):
    """LIME's classifier: RGB batches [n, s, s, 3] -> [n, 2] probabilities (negative, positive), with the
    `background` pixels of every batch image put back to those of `image`."""

    def predict(rgb_batch: np.ndarray) -> np.ndarray:
        gray = rgb_batch[..., :1].astype(np.float32)
        gray[:, background] = image[background]
        return np.asarray(bundle.predict_proba(gray), np.float64)

    return predict


def _top_mask(segments: np.ndarray, segment_weights: list[tuple[int, float]], sign: int, top_k: int) -> np.ndarray:
    chosen = [segment for segment, weight in segment_weights if sign * weight > 0][:top_k]
    return np.isin(segments, chosen)


def explain_lime(
    bundle,
    image: np.ndarray,
    num_samples: int = 1000,
    seed: int = 0,
    n_segments: int = 50,
    compactness: float = 10.0,
    top_k: int = 5,
    hide_value: float | None = None,
    batch_size: int = 128,
    label: int = POSITIVE,
) -> LimeMap:
    """LIME explanation of `bundle.predict_proba` (column `label`: the positive class of a binary bundle, any class
    of a K-class one) for one image [s, s, 1] in [0, 255].

    Switched-off anatomy superpixels are filled with `hide_value`, by default the image's mean intensity: a flat
    fill keeps perturbed images closer to what the model has seen than black does. The background
    (`dark_background`) stays as it is.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 1:
        raise InputError(f"LIME needs one grayscale image of shape (s, s, 1), got {image.shape}")
    if num_samples < 2:
        raise InputError(f"LIME num_samples must be at least 2, got {num_samples}")
    background = dark_background(image)
    segments = radiograph_segments(image, n_segments, compactness, background)
    background_ids = set(np.unique(segments[background]).tolist())
    explanation = LimeImageExplainer(random_state=seed).explain_instance(
        np.repeat(image, 3, axis=-1),
        _classifier_fn(bundle, image, background),
        labels=(label,),
        top_labels=None,
        hide_color=float(image.mean()) if hide_value is None else hide_value,
        num_samples=num_samples,
        batch_size=batch_size,
        segmentation_fn=lambda _: segments,
    )
    anatomy = [(segment, weight) for segment, weight in explanation.local_exp[label] if segment not in background_ids]
    return _lime_map(segments, background, sorted(anatomy, key=lambda pair: -abs(pair[1])), top_k, explanation.score)


def _lime_map(segments: np.ndarray, background: np.ndarray, segment_weights: list, top_k: int, score) -> LimeMap:
    """The map of the anatomy superpixels' weights (largest first in `segment_weights`) and their top-k masks."""
    per_segment = np.zeros(segments.max() + 1, np.float32)
    for segment, weight in segment_weights:
        per_segment[segment] = weight
    return LimeMap(
        weights=per_segment[segments],
        segments=segments,
        background=background,
        positive_mask=_top_mask(segments, segment_weights, +1, top_k),
        negative_mask=_top_mask(segments, segment_weights, -1, top_k),
        score=float(score),
    )
