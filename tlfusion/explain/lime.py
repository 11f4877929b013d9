"""LIME on a whole fitted bundle: superpixels of the radiograph switched off, the fused classifier re-queried.

The grayscale image is widened to RGB for LIME and narrowed back inside the classifier function, which sends
large batches to `bundle.predict_proba`. Superpixels come from SLIC, computed once per image; every image gets
a fresh explainer seeded with `seed`, so a result does not depend on which images were explained before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from lime.lime_image import LimeImageExplainer
from skimage.segmentation import slic

from tlfusion.errors import InputError

POSITIVE = 1


@dataclass(frozen=True)
class LimeMap:
    """One image's LIME explanation of the positive class.

    `weights` [s, s]: each pixel carries its superpixel's weight (> 0 supports the positive class, < 0 opposes it);
    `segments` [s, s]: superpixel ids; `positive_mask` / `negative_mask` [s, s] bool: the top-k superpixels that
    support / oppose it most; `score`: R^2 of LIME's local linear model.
    """

    weights: np.ndarray
    segments: np.ndarray
    positive_mask: np.ndarray
    negative_mask: np.ndarray
    score: float


def radiograph_segments(image: np.ndarray, n_segments: int = 50, compactness: float = 10.0) -> np.ndarray:
    """SLIC superpixels [s, s] (ids 0..k-1) of a grayscale [0, 255] image [s, s, 1], on its RGB (CIELAB) copy.

    On a gray image CIELAB's L channel spans 0-100, for which a compactness near 10 gives regular regions that
    still follow bone and soft-tissue edges.
    """
    rgb = np.repeat(np.asarray(image, np.float64).reshape(image.shape[0], image.shape[1], 1) / 255.0, 3, axis=-1)
    segments = slic(rgb, n_segments=n_segments, compactness=compactness, sigma=1.0, start_label=0, channel_axis=-1)
    return np.unique(segments, return_inverse=True)[1].reshape(segments.shape)


def _classifier_fn(bundle):
    """LIME's classifier: RGB batches [n, s, s, 3] -> [n, 2] probabilities (negative, positive)."""

    def predict(rgb_batch: np.ndarray) -> np.ndarray:
        return np.asarray(bundle.predict_proba(rgb_batch[..., :1].astype(np.float32)), np.float64)

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
) -> LimeMap:
    """LIME explanation of `bundle.predict_proba` (positive class) for one image [s, s, 1] in [0, 255].

    Switched-off superpixels are filled with `hide_value`, by default the image's mean intensity: a flat fill
    keeps perturbed images closer to what the model has seen than black does.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 1:
        raise InputError(f"LIME needs one grayscale image of shape (s, s, 1), got {image.shape}")
    if num_samples < 2:
        raise InputError(f"LIME num_samples must be at least 2, got {num_samples}")
    segments = radiograph_segments(image, n_segments, compactness)
    explanation = LimeImageExplainer(random_state=seed).explain_instance(
        np.repeat(image, 3, axis=-1),
        _classifier_fn(bundle),
        labels=(POSITIVE,),
        top_labels=None,
        hide_color=float(image.mean()) if hide_value is None else hide_value,
        num_samples=num_samples,
        batch_size=batch_size,
        segmentation_fn=lambda _: segments,
    )
    segment_weights = sorted(explanation.local_exp[POSITIVE], key=lambda pair: -abs(pair[1]))
    per_segment = np.zeros(segments.max() + 1, np.float32)
    for segment, weight in segment_weights:
        per_segment[segment] = weight
    return LimeMap(
        weights=per_segment[segments],
        segments=segments,
        positive_mask=_top_mask(segments, segment_weights, +1, top_k),
        negative_mask=_top_mask(segments, segment_weights, -1, top_k),
        score=float(explanation.score),
    )
