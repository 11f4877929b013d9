"""Multi-label explanations: Grad-CAM per finding, for the top findings of each case, and their review page.

The findings of a case are ranked by the probabilities of the model under review (the selected semantic-prototype
model); each map is Grad-CAM of one finding's logit of the fine-tuned backbones' sigmoid heads (one output per
finding), averaged over the backbones. The page says so: the maps show where the backbones find evidence for a
finding, not how the semantic model combines the fused features.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlfusion.data.images import load_for_review
from tlfusion.errors import InputError
from tlfusion.explain.gallery import STYLE
from tlfusion.explain.gradcam import GradCAM
from tlfusion.explain.overlay import save_heatmap_overlay, save_image
from tlfusion.fileio import write_text
from tlfusion.run.paths import GALLERY

TOP_FINDINGS = 3


@dataclass(frozen=True)
class FindingCase:
    """One explained image: its true findings, its top findings with their probabilities, and its PNGs."""

    case_id: str
    path: str
    true_findings: tuple[str, ...]
    top: tuple[tuple[str, float], ...]
    images: tuple[tuple[str, str], ...]
    """(title, PNG file name in the gallery folder): the radiograph, then one overlay per top finding."""


def top_findings(probabilities: np.ndarray, count: int = TOP_FINDINGS) -> np.ndarray:
    """Column indices of each row's `count` highest probabilities, highest first (ties: the earlier column)."""
    return np.argsort(-np.asarray(probabilities, dtype=float), axis=1, kind="stable")[:, :count]


def finding_maps(models: Mapping[str, object], images: np.ndarray, indices: Sequence[int]) -> dict[int, np.ndarray]:
    """Finding index -> Grad-CAM of that output [n, s, s], averaged over `models` (each built and compiled once)."""
    explainers = [GradCAM(model) for model in models.values()]
    return {int(j): np.mean([explain(images, int(j)) for explain in explainers], axis=0) for j in indices}


def explain_findings(
    models: Mapping[str, object],
    paths: Sequence[str],
    probabilities: np.ndarray,
    truth: np.ndarray,
    findings: Sequence[str],
    out_dir: str | Path,
    *,
    image_size: int,
    clahe: bool = False,
    model: str = "the model",
    count: int = TOP_FINDINGS,
) -> Path:
    """Grad-CAM of each case's `count` most probable findings; writes the PNGs and `out_dir/index.html`.

    `probabilities` and `truth` are [cases, findings]; `models` are backbones with one output per finding.
    """
    if not paths:
        raise InputError("explain: no images to explain")
    for name, backbone in models.items():
        if int(backbone.output.shape[-1]) != len(findings):
            raise InputError(f"explain: backbone {name} has {backbone.output.shape[-1]} outputs, not one per finding")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, shown = load_for_review(list(paths), image_size, clahe)
    tops = top_findings(probabilities, count)
    maps = finding_maps(models, images, sorted(set(tops.ravel().tolist())))
    cases = []
    for i, path in enumerate(paths):
        case_id = f"{i:03d}_{Path(path).stem[:40]}"
        original = shown[i]
        files = [("radiograph", save_image(original, out_dir / f"{case_id}.png").name)]
        for rank, j in enumerate(tops[i]):
            state = "present" if truth[i, j] else "absent"
            title = f"{findings[j]}: P={probabilities[i, j]:.2f} ({state})"
            png = save_heatmap_overlay(original, maps[int(j)][i], out_dir / f"{case_id}_finding{rank + 1}.png", title)
            files.append((title, png.name))
        true = tuple(name for name, present in zip(findings, truth[i], strict=True) if present)
        top = tuple((findings[j], float(probabilities[i, j])) for j in tops[i])
        cases.append(FindingCase(case_id, str(path), true, top, tuple(files)))
    return write_text(out_dir / GALLERY, _page(cases, model, list(models)))


def _row(case: FindingCase) -> str:
    images = "".join(
        f'<td><a href="{html.escape(name)}"><img src="{html.escape(name)}" alt="{html.escape(title)}"></a></td>'
        for title, name in case.images
    )
    top = ", ".join(f"{html.escape(name)} {p:.2f}" for name, p in case.top)
    true = html.escape(", ".join(case.true_findings) or "No Finding")
    return f"<tr><td>{html.escape(case.case_id)}</td>{images}<td>{true}</td><td>{top}</td></tr>"


def _page(cases: Sequence[FindingCase], model: str, backbones: Sequence[str]) -> str:
    count = len(cases[0].images) - 1
    headers = ["case", "radiograph", *(f"finding {rank + 1}" for rank in range(count)), "true findings", "top"]
    note = (
        f"The findings of each case are ranked by the probabilities of {model}; each map is Grad-CAM of that "
        f"finding's logit of the fine-tuned backbones' sigmoid heads ({', '.join(backbones)}), averaged over them. "
        f"It shows where the backbones find evidence for the finding, not how {model} combines their features."
    )
    rows = "\n".join(_row(case) for case in cases)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>tlfusion explanations</title>'
        f"<style>{STYLE}</style></head><body>\n<h1>Grad-CAM per finding: {html.escape(model)}</h1>\n"
        f'<p>{len(cases)} test cases, the most confident first.</p>\n<p class="note">{html.escape(note)}</p>\n'
        f'<div class="scroll"><table><thead><tr>{"".join(f"<th>{h}</th>" for h in headers)}</tr></thead><tbody>\n'
        f"{rows}\n</tbody></table></div>\n</body></html>\n"
    )
