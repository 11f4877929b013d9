"""Explanations for review: Grad-CAM of the selected model and of each backbone, LIME on the whole bundle, and an
HTML gallery of them.

`explain_cases` is the one call the command line and the pipeline need.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tlfusion.data.images import load_for_review
from tlfusion.errors import InputError
from tlfusion.explain.decision import DecisionHead, decision_head, exact_head_note, selected_model_maps
from tlfusion.explain.gallery import Case, write_gallery
from tlfusion.explain.gradcam import MEAN_KEY, bundle_gradcam, class_index
from tlfusion.explain.lime import explain_lime
from tlfusion.explain.overlay import save_heatmap_overlay, save_image, save_lime_overlay

METHODS = ("gradcam", "lime")
_PNG_TITLE_WIDTH = 44


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


def _gradcam_maps(
    bundle, images: np.ndarray, reference: np.ndarray | None, reference_label: str, threshold: float, seed: int
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Column title -> maps [n, s, s]: the selected model's map first, then each backbone's own head; and the notes
    that say how the selected model's map was made (or why it is missing)."""
    model = bundle.meta.get("model", "bundle")
    maps, notes = {}, []
    try:
        head = decision_head(bundle.estimator, reference, threshold, seed)
    except InputError as error:
        notes.append(f"No Grad-CAM of the selected model {model}: {error}.")
    else:
        maps[head.title(model)] = selected_model_maps(bundle, images, head)
        notes.append(_head_note(head, model, reference_label))
    heads = bundle_gradcam(bundle, images)
    heads.pop(MEAN_KEY)
    for name, backbone_maps in heads.items():
        maps[f"Grad-CAM of backbone {name}'s own head (not the selected model)"] = backbone_maps
    notes.append(
        "The per-backbone maps follow each backbone's own classification head (the one it was fine-tuned with), "
        f"not the selected model; they show what that backbone attends to, not what {model} decides on."
    )
    return maps, notes


def _head_note(head: DecisionHead, model: str, reference_label: str) -> str:
    if head.exact:
        return exact_head_note(model, "its decision score")
    fidelity = head.fidelity
    return (
        f"The selected model {model} is not differentiable (its classifier is not linear), so its Grad-CAM follows "
        f"a disclosed surrogate: a ridge regression of {model}'s log-odds on the fused features, fitted on "
        f"{fidelity.rows} {reference_label}. Fidelity, out of fold on those rows: the surrogate decides the same "
        f"class as {model} on {fidelity.agreement:.0%} of them (agreement {fidelity.agreement:.2f}); "
        f"correlation of log-odds {fidelity.correlation:.2f}."
    )


def _case_images(
    bundle,
    case_id: str,
    original: np.ndarray,
    image: np.ndarray,
    cams: dict[str, np.ndarray],
    out_dir: Path,
    lime_samples: int,
    seed: int,
) -> dict[str, str]:
    """Write one case's PNGs (the radiograph as shown, `original`, its Grad-CAM overlays, its LIME overlay when
    `lime_samples` > 0)."""
    files = {"image": save_image(original, out_dir / f"{case_id}.png").name}
    for index, (title, heatmap) in enumerate(cams.items()):
        png = out_dir / f"{case_id}_gradcam_{index}.png"
        files[title] = save_heatmap_overlay(original, heatmap, png, textwrap.fill(title, _PNG_TITLE_WIDTH)).name
    if lime_samples:
        explanation = explain_lime(bundle, image, num_samples=lime_samples, seed=seed)
        title = f"LIME of the selected model: green for {bundle.class_names[1]}, red against"
        png = out_dir / f"{case_id}_lime.png"
        files[title] = save_lime_overlay(original, explanation, png, textwrap.fill(title, _PNG_TITLE_WIDTH)).name
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
    reference: np.ndarray | None = None,
    reference_label: str = "reference images",
) -> Path:
    """Explain the positive class for each image and write the review gallery; returns `out_dir/index.html`.

    `labels` (0/1 or class names; None when unknown) mark each case correct or not at `threshold` (default: the
    bundle's own `threshold`, else 0.5).
    Grad-CAM: first the selected model's own map (`tlfusion.explain.decision`: exact for a linear classifier,
    else a surrogate fitted on `reference`, feature rows the bundle's estimator takes, described on the page as
    `reference_label`), then each backbone's own head. LIME explains the whole bundle.
    """
    if len(bundle.class_names) != 2:
        raise InputError(
            f"explain_cases: works on binary bundles; this one has {len(bundle.class_names)} classes "
            "(use tlfusion.explain.classes.explain_class_cases)"
        )
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise InputError(f"explain: unknown method(s) {unknown}; known: {list(METHODS)}")
    if not paths:
        raise InputError("explain: no images to explain")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label_indices = _label_indices(labels, len(paths), bundle.class_names)
    threshold = getattr(bundle, "threshold", 0.5) if threshold is None else threshold
    images, shown = load_for_review(paths, bundle.image_size, clahe)
    probabilities = np.asarray(bundle.predict_proba(images), np.float64)[:, 1]
    cams, notes = {}, []
    if "gradcam" in methods:
        cams, notes = _gradcam_maps(bundle, images, reference, reference_label, threshold, seed)
    lime_per_case = lime_samples if "lime" in methods else 0
    cases = []
    for index, path in enumerate(paths):
        case_id = _case_id(index, path)
        case_cams = {title: maps[index] for title, maps in cams.items()}
        files = _case_images(bundle, case_id, shown[index], images[index], case_cams, out_dir, lime_per_case, seed)
        cases.append(Case(case_id, str(path), float(probabilities[index]), label_indices[index], files))
    model = bundle.meta.get("model", "bundle")
    return write_gallery(cases, out_dir, bundle.class_names, threshold, model=model, notes=notes)
