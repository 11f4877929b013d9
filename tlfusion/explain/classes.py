"""Explanations of a K-class bundle (K >= 3): Grad-CAM of the selected model and LIME, each for the predicted
class and, where it differs, the true class; a review page with the cases grouped by confusion cell.

The selected model's map follows `tlfusion.explain.decision` with the explained class's probability column: exact
for a linear classifier (the class logit), else a disclosed ridge surrogate of that class's log-odds fitted on the
reference rows. The backbones' own fine-tuning heads are not drawn (an ordinal head's outputs are not classes).
"""

from __future__ import annotations

import csv
import html
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tlfusion.data.images import load_for_review
from tlfusion.errors import InputError
from tlfusion.explain.decision import DecisionHead, decision_head, exact_head_note, selected_model_maps
from tlfusion.explain.lime import explain_lime
from tlfusion.explain.overlay import save_heatmap_overlay, save_image, save_lime_overlay
from tlfusion.fileio import write_atomic, write_text
from tlfusion.run.paths import GALLERY, REVIEW

METHODS = ("gradcam", "lime")
REVIEW_COLUMNS = ("case_id", "path", "true_label", "predicted", "probability", "correct", "explained", "images")
_TITLE_WIDTH = 44
_STYLE = """
body { font-family: sans-serif; margin: 1em; } p.note { max-width: 75em; font-size: 14px; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: 4px; text-align: center; }
td { font-size: 13px; } tr.incorrect { background: #fde8e8; }
img { display: block; width: 100%; max-width: 190px; height: auto; margin: 0 auto; }
"""


def explain_class_cases(
    bundle,
    paths: Sequence[str | Path],
    labels: Sequence[int] | None,
    out_dir: str | Path,
    methods: Sequence[str] = METHODS,
    lime_samples: int = 1000,
    seed: int = 0,
    reference: np.ndarray | None = None,
    reference_label: str = "reference images",
) -> Path:
    """Explain each image's predicted class (and its true class, `labels` as class codes, where they differ) and
    write `out_dir/index.html` and `out_dir/review.csv`; returns the page. `reference`: feature rows for a
    non-linear classifier's surrogate."""
    if bundle.task != "multiclass":
        raise InputError("explain: explain_class_cases is for K-class bundles; use explain_cases for binary ones")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not paths:
        raise InputError(f"explain: unknown method(s) {unknown} or no images; known: {list(METHODS)}")
    K = len(bundle.class_names)
    if labels is not None and (len(labels) != len(paths) or not all(0 <= int(code) < K for code in labels)):
        raise InputError(f"explain: labels must be one class code 0..{K - 1} per image")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, shown = load_for_review(paths, bundle.image_size, bundle.clahe)
    prob = np.asarray(bundle.predict_proba(images), np.float64)
    predicted = prob.argmax(axis=1)
    truths = predicted if labels is None else np.asarray(labels, int)
    targets = [[int(p)] + ([int(t)] if t != p else []) for p, t in zip(predicted, truths, strict=True)]
    heads, notes = _class_heads(bundle, sorted({c for pair in targets for c in pair}), reference, seed, methods)
    notes += [_head_note(head, bundle.meta.get("model", "bundle"), reference_label) for head in heads.values()][:1]
    cases = []
    for index, path in enumerate(paths):
        pictures = (shown[index], images[index])
        files = _case_files(bundle, index, pictures, targets[index], heads, out_dir, methods, lime_samples)
        truth = None if labels is None else int(labels[index])
        cases.append((index, str(path), truth, int(predicted[index]), float(prob[index].max()), targets[index], files))
    write_atomic(out_dir / REVIEW, lambda temp: _write_review(temp, cases, bundle.class_names))
    return write_text(out_dir / GALLERY, _page(cases, bundle.class_names, bundle.meta.get("model", "bundle"), notes))


def _class_heads(
    bundle, classes: list[int], reference: np.ndarray | None, seed: int, methods: Sequence[str]
) -> tuple[dict[int, DecisionHead], list[str]]:
    """Class code -> the selected model's head for that class's probability (`decision_head`), and notes."""
    if "gradcam" not in methods:
        return {}, []
    try:
        return {c: decision_head(bundle.estimator, reference, 0.5, seed, column=c) for c in classes}, []
    except InputError as error:
        return {}, [f"No Grad-CAM of the selected model: {error}."]


def _head_note(head: DecisionHead, model: str, reference_label: str) -> str:
    """The review page's note on how the selected model's per-class Grad-CAM was made (exact or a surrogate)."""
    if head.exact:
        return exact_head_note(model, "the explained class's logit")
    rows, agreement, correlation = head.fidelity.rows, head.fidelity.agreement, head.fidelity.correlation
    return (
        f"The selected model {model} is not linear, so its Grad-CAM follows a disclosed surrogate per class: a ridge "
        f"regression of that class's log-odds on the fused features, fitted on {rows} {reference_label}. "
        f"Fidelity (out of fold, first explained class): the surrogate and {model} agree on P(class) >= 0.5 for "
        f"{agreement:.0%} of them; correlation of log-odds {correlation:.2f}."
    )


def _case_files(
    bundle,
    index: int,
    pictures: tuple[np.ndarray, np.ndarray],
    targets: list[int],
    heads: dict[int, DecisionHead],
    out_dir: Path,
    methods: Sequence[str],
    lime_samples: int,
) -> dict[str, str]:
    """One case's PNGs from `pictures` (the radiograph as shown, the model input): the radiograph, then per explained
    class its Grad-CAM and LIME overlays."""
    case_id = f"{index:03d}"
    original, image = pictures
    files = {"radiograph": save_image(original, out_dir / f"{case_id}.png").name}
    for role, c in zip(("predicted", "true"), targets, strict=False):
        name = bundle.class_names[c]
        if c in heads:
            heatmap = selected_model_maps(bundle, image[None], heads[c])[0]
            title = f"Grad-CAM for {role} class {name}" + ("" if heads[c].exact else " (surrogate)")
            png = out_dir / f"{case_id}_gradcam_{c}.png"
            files[title] = save_heatmap_overlay(original, heatmap, png, textwrap.fill(title, _TITLE_WIDTH)).name
        if "lime" in methods and lime_samples:
            explanation = explain_lime(bundle, image, num_samples=lime_samples, seed=0, label=c)
            title = f"LIME for {role} class {name}: green for it, red against"
            png = out_dir / f"{case_id}_lime_{c}.png"
            files[title] = save_lime_overlay(original, explanation, png, textwrap.fill(title, _TITLE_WIDTH)).name
    return files


def _write_review(path: Path, cases: list[tuple], class_names: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=REVIEW_COLUMNS)
        writer.writeheader()
        for index, image_path, truth, predicted, probability, targets, files in cases:
            writer.writerow(
                {
                    "case_id": f"{index:03d}",
                    "path": image_path,
                    "true_label": "" if truth is None else class_names[truth],
                    "predicted": class_names[predicted],
                    "probability": f"{probability:.6f}",
                    "correct": "" if truth is None else truth == predicted,
                    "explained": "|".join(class_names[c] for c in targets),
                    "images": "|".join(files.values()),
                }
            )


def _page(cases: list[tuple], class_names: Sequence[str], model: str, notes: Sequence[str]) -> str:
    """The review page: one table per confusion cell (true -> predicted), mistakes' cells first."""
    cells: dict[tuple, list[tuple]] = {}
    for case in cases:
        cells.setdefault((case[2], case[3]), []).append(case)
    order = sorted(cells, key=lambda cell: (cell[0] == cell[1], -1 if cell[0] is None else cell[0], cell[1]))
    blocks = []
    for truth, predicted in order:
        shown = "unknown" if truth is None else class_names[truth]
        heading = f"true {shown} → predicted {class_names[predicted]} ({len(cells[truth, predicted])})"
        rows = "".join(_row(case, class_names) for case in cells[truth, predicted])
        blocks.append(f"<h2>{html.escape(heading)}</h2>\n<table><tbody>{rows}</tbody></table>\n")
    mistakes = sum(case[2] is not None and case[2] != case[3] for case in cases)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>tlfusion explanations</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>Explanations for review: {html.escape(model)}</h1>\n"
        f"<p>{len(cases)} cases, {mistakes} misclassified by {html.escape(model)} (predicted: the most probable "
        "class), grouped by confusion cell, mistakes first. Each case shows the predicted class's maps, then the "
        "true class's where they differ. Record verdicts in <code>review.csv</code>.</p>\n"
        + "".join(f'<p class="note">{html.escape(note)}</p>\n' for note in notes)
        + "".join(blocks)
        + "</body></html>\n"
    )


def _row(case: tuple, class_names: Sequence[str]) -> str:
    index, path, truth, predicted, probability, _, files = case
    wrong = truth is not None and truth != predicted
    images = "".join(
        f'<td><img src="{html.escape(name)}" alt="{html.escape(title)}" title="{html.escape(title)}"></td>'
        for title, name in files.items()
    )
    label = (
        f"{index:03d}<br>{html.escape(Path(path).name)}<br>P({html.escape(class_names[predicted])}) {probability:.3f}"
    )
    return f'<tr class="{"incorrect" if wrong else "correct"}"><td>{label}</td>{images}</tr>'
