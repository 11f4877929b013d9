"""Explanations for review: Grad-CAM per backbone, LIME on the whole bundle, and an HTML gallery of both.

`explain_cases` is the one call the command line and the pipeline need.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tlfusion.data.images import apply_clahe, load_batch, read_gray
from tlfusion.errors import InputError
from tlfusion.explain.gallery import Case, write_gallery
from tlfusion.explain.gradcam import MEAN_KEY, GradCAM, bundle_gradcam, class_index
from tlfusion.explain.lime import LimeMap, explain_lime
from tlfusion.explain.overlay import save_heatmap_overlay, save_image, save_lime_overlay

METHODS = ("gradcam", "lime")

__all__ = ["METHODS", "Case", "GradCAM", "LimeMap", "bundle_gradcam", "explain_cases", "explain_lime", "write_gallery"]


def _case_id(index: int, path: str | Path) -> str:
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem)[:40]


def _label_indices(labels: Sequence[int | str] | None, count: int, class_names: Sequence[str]) -> list[int | None]:
    if labels is None:
        return [None] * count
    if len(labels) != count:
        raise InputError(f"explain: {len(labels)} labels for {count} images")
    indices = [class_index(label, class_names) for label in labels]
    if any(index not in (0, 1) for index in indices):
        raise InputError(f"explain: labels must be 0/1 or one of {list(class_names)}")
    return indices


def _case_images(
    bundle,
    case_id: str,
    path: str | Path,
    image: np.ndarray,
    cams: dict[str, np.ndarray],
    out_dir: Path,
    clahe: bool,
    lime_samples: int,
    seed: int,
) -> dict[str, str]:
    """Write one case's PNGs (the radiograph, its Grad-CAM overlays, its LIME overlay when `lime_samples` > 0)."""
    original = read_gray(path)
    original = apply_clahe(original) if clahe else original
    positive = bundle.class_names[1]
    files = {"image": save_image(original, out_dir / f"{case_id}.png").name}
    for name, heatmap in cams.items():
        title = f"Grad-CAM {name} ({positive})"
        files[title] = save_heatmap_overlay(original, heatmap, out_dir / f"{case_id}_gradcam_{name}.png", title).name
    if lime_samples:
        explanation = explain_lime(bundle, image, num_samples=lime_samples, seed=seed)
        title = f"LIME: green for {positive}, red against"
        files["LIME"] = save_lime_overlay(original, explanation, out_dir / f"{case_id}_lime.png", title).name
    return files


def explain_cases(
    bundle,
    paths: Sequence[str | Path],
    labels: Sequence[int | str] | None,
    out_dir: str | Path,
    methods: Sequence[str] = METHODS,
    lime_samples: int = 1000,
    seed: int = 0,
    clahe: bool = False,
    threshold: float | None = None,
) -> Path:
    """Explain the positive class for each image and write the review gallery; returns `out_dir/index.html`.

    `labels` (0/1 or class names; None when unknown) mark each case correct or not at `threshold` (default: the
    bundle's own `threshold`, else 0.5).
    Grad-CAM maps come per backbone (plus their mean when there are several); LIME explains the whole bundle.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise InputError(f"explain: unknown method(s) {unknown}; known: {list(METHODS)}")
    if not paths:
        raise InputError("explain: no images to explain")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label_indices = _label_indices(labels, len(paths), bundle.class_names)
    images = load_batch(paths, bundle.image_size, clahe)
    probabilities = np.asarray(bundle.predict_proba(images), np.float64)[:, 1]
    cams = bundle_gradcam(bundle, images) if "gradcam" in methods else {}
    if len(cams) == 2:  # one backbone: its mean is itself
        cams.pop(MEAN_KEY)
    lime_per_case = lime_samples if "lime" in methods else 0
    cases = []
    for index, path in enumerate(paths):
        case_id = _case_id(index, path)
        case_cams = {name: maps[index] for name, maps in cams.items()}
        files = _case_images(bundle, case_id, path, images[index], case_cams, out_dir, clahe, lime_per_case, seed)
        cases.append(Case(case_id, str(path), float(probabilities[index]), label_indices[index], files))
    threshold = getattr(bundle, "threshold", 0.5) if threshold is None else threshold
    return write_gallery(cases, out_dir, bundle.class_names, threshold)
