"""The review page: `index.html` (one row per case, mistakes first, sortable in the browser) and `review.csv`.

The page is self-contained: inline CSS and a few lines of inline JavaScript, images by relative links to PNGs in
the same folder, nothing fetched from the network.
"""

from __future__ import annotations

import csv
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tlfusion.errors import InputError
from tlfusion.fileio import write_atomic, write_text
from tlfusion.run.paths import GALLERY, REVIEW

REVIEW_COLUMNS = (
    "case_id",
    "path",
    "true_label",
    "probability",
    "predicted",
    "correct",
    "reviewer_verdict",
    "reviewer_notes",
)

STYLE = """
body { font-family: sans-serif; margin: 1em; }
p.note { max-width: 75em; font-size: 14px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { border: 1px solid #ccc; padding: 4px; text-align: center; vertical-align: middle; }
th { font-size: 12px; font-weight: normal; }
th[data-key] { cursor: pointer; text-decoration: underline; }
td { font-size: 13px; }
td:first-child { max-width: 9em; overflow-wrap: anywhere; }
tr.incorrect { background: #fde8e8; }
img { display: block; width: 100%; max-width: 190px; height: auto; margin: 0 auto; }
"""
_IMAGE_HEADERS = {"image": "radiograph"}

_SORT_SCRIPT = """
document.querySelectorAll("th[data-key]").forEach(function (header) {
  header.addEventListener("click", function () {
    var body = document.querySelector("#cases tbody");
    var key = header.dataset.key;
    var sign = header.dataset.dir === "asc" ? -1 : 1;
    header.dataset.dir = sign === 1 ? "asc" : "desc";
    Array.from(body.rows)
      .sort(function (a, b) { return sign * (parseFloat(a.dataset[key]) - parseFloat(b.dataset[key])); })
      .forEach(function (row) { body.appendChild(row); });
  });
});
"""


@dataclass(frozen=True)
class Case:
    """One explained image: its scores and the PNGs (column title -> file name inside the gallery folder)."""

    case_id: str
    path: str
    probability: float
    true_label: int | None = None
    images: dict[str, str] = field(default_factory=dict)

    def predicted(self, threshold: float) -> int:
        return int(self.probability >= threshold)

    def correct(self, threshold: float) -> bool | None:
        return None if self.true_label is None else self.predicted(threshold) == self.true_label

    def confidence(self, threshold: float) -> float:
        """Probability of the predicted class."""
        return self.probability if self.predicted(threshold) else 1.0 - self.probability


def review_order(cases: Sequence[Case], threshold: float = 0.5) -> list[Case]:
    """Mistakes first, most confident first; then the other cases, least confident (most borderline) first."""
    return sorted(
        cases,
        key=lambda case: (
            (0, -case.confidence(threshold)) if case.correct(threshold) is False else (1, case.confidence(threshold))
        ),
    )


def _outcome(case: Case, threshold: float) -> str:
    if case.true_label is None:
        return ""
    predicted = case.predicted(threshold)
    return ("T" if predicted == case.true_label else "F") + ("P" if predicted else "N")


def _row(case: Case, rank: int, class_names: Sequence[str], threshold: float) -> str:
    correct = case.correct(threshold)
    cells = [html.escape(case.case_id)]
    cells += [
        f'<a href="{html.escape(name)}"><img src="{html.escape(name)}" alt="{html.escape(title)}"></a>'
        for title, name in case.images.items()
    ]
    cells += [
        html.escape(class_names[case.true_label]) if case.true_label is not None else "",
        f"{case.probability:.3f}",
        f"{case.confidence(threshold):.3f}",
        html.escape(class_names[case.predicted(threshold)]),
        {True: "correct", False: "incorrect", None: ""}[correct] + f" {_outcome(case, threshold)}",
    ]
    attributes = (
        f'class="{"incorrect" if correct is False else "correct"}" data-order="{rank}" '
        f'data-probability="{case.probability:.6f}" data-confidence="{case.confidence(threshold):.6f}"'
    )
    return f"<tr {attributes}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _page(ordered: list[Case], class_names: Sequence[str], threshold: float, model: str, notes: Sequence[str]) -> str:
    titles = list(ordered[0].images) if ordered else []
    shown = (_IMAGE_HEADERS.get(title, title) for title in titles)
    headers = ['<th data-key="order">case</th>', *(f"<th>{html.escape(title)}</th>" for title in shown)]
    headers += [
        "<th>true label</th>",
        f'<th data-key="probability">P({html.escape(class_names[1])})</th>',
        '<th data-key="confidence">confidence</th>',
        "<th>predicted</th>",
        "<th>outcome</th>",
    ]
    mistakes = sum(case.correct(threshold) is False for case in ordered)
    rows = "\n".join(_row(case, rank, class_names, threshold) for rank, case in enumerate(ordered))
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>tlfusion explanations</title>'
        f"<style>{STYLE}</style></head><body>\n<h1>Explanations for review: {html.escape(model)}</h1>\n"
        f"<p>{len(ordered)} cases, {mistakes} misclassified by {html.escape(model)} at threshold {threshold:.3f}; "
        f"mistakes first, then by confidence. Outcome: T/F = correct or not, P/N = predicted "
        f"{html.escape(class_names[1])} / {html.escape(class_names[0])}. Click an underlined header to sort. "
        "Record verdicts in <code>review.csv</code>.</p>\n"
        + "".join(f'<p class="note">{html.escape(note)}</p>\n' for note in notes)
        + f'<div class="scroll"><table id="cases"><thead><tr>{"".join(headers)}</tr></thead><tbody>\n{rows}\n'
        "</tbody></table></div>\n"
        f"<script>{_SORT_SCRIPT}</script>\n</body></html>\n"
    )


def _write_review_csv(path: Path, ordered: list[Case], class_names: Sequence[str], threshold: float) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=REVIEW_COLUMNS)
        writer.writeheader()
        for case in ordered:
            writer.writerow(
                {
                    "case_id": case.case_id,
                    "path": case.path,
                    "true_label": "" if case.true_label is None else class_names[case.true_label],
                    "probability": f"{case.probability:.6f}",
                    "predicted": class_names[case.predicted(threshold)],
                    "correct": "" if case.correct(threshold) is None else case.correct(threshold),
                    "reviewer_verdict": "",
                    "reviewer_notes": "",
                }
            )


def _check_images(cases: Sequence[Case], out_dir: Path) -> None:
    for case in cases:
        if list(case.images) != list(cases[0].images):
            raise InputError(f"case {case.case_id}: image columns {list(case.images)} differ from the first case's")
        for name in case.images.values():
            if Path(name).name != name or not (out_dir / name).is_file():
                raise InputError(f"{out_dir / name}: gallery image missing (case {case.case_id})")


def write_gallery(
    cases: Sequence[Case],
    out_dir: str | Path,
    class_names: Sequence[str] = ("negative", "positive"),
    threshold: float = 0.5,
    model: str = "the model",
    notes: Sequence[str] = (),
) -> Path:
    """Write `out_dir/index.html` and `out_dir/review.csv` for cases whose PNGs are already in `out_dir`; `model`
    names the model whose probabilities the cases hold, `notes` (plain text) say how the images were made."""
    out_dir = Path(out_dir)
    _check_images(cases, out_dir)
    ordered = review_order(cases, threshold)
    write_atomic(out_dir / REVIEW, lambda temporary: _write_review_csv(temporary, ordered, class_names, threshold))
    return write_text(out_dir / GALLERY, _page(ordered, class_names, threshold, model, notes))
