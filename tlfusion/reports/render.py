"""The report's building blocks (cells, tables, sections) and their Markdown and HTML renderings."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tlfusion.reports.plots import Plot

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Cell:
    text: str
    sort: float | str | None = None
    """Value the HTML table sorts by (``None``: undefined, sorts last)."""
    bold: bool = False


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[Cell]]


Block = str | list | Table | Plot  # paragraph (may hold **bold** / `code`), bullet list, table, figure
Section = tuple[str, list[Block]]


# ----------------------------------------------------------------------------------------------- rendering

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1300px;
       margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ccc; } h2 { font-size: 1.25em; margin-top: 1.8em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; white-space: nowrap; }
th { background: #f2f4f7; cursor: pointer; user-select: none; text-align: left; }
th:hover { background: #e4e8ee; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; } td b { color: #0b4f9c; } .ci { color: #777; font-size: 11px; }
code { background: #f2f4f7; padding: 0 3px; border-radius: 3px; }
.plots { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; max-width: 100%; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; max-width: 560px; }
"""

_SORT_SCRIPT = """
for (const th of document.querySelectorAll("table.sortable th")) {
  th.title = "click to sort";
  th.addEventListener("click", () => {
    const body = th.closest("table").tBodies[0], up = th.dataset.order !== "asc";
    th.dataset.order = up ? "asc" : "desc";
    const key = row => row.cells[th.cellIndex].dataset.sort;
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === y) return 0; if (x === "") return 1; if (y === "") return -1;
      const order = isNaN(x) || isNaN(y) ? x.localeCompare(y) : Number(x) - Number(y);
      return up ? order : -order;
    });
    body.append(...rows);
  });
}
"""


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    def cell(item: Cell) -> str:
        text = item.text.replace("|", "\\|")
        return f"**{text}**" if item.bold else text

    lines = [f"# {title}", ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for block in blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(name.replace("|", "\\|") for name in block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(map(cell, row)) + " |" for row in block.rows]
            elif isinstance(block, Plot):
                lines += [f"![{Path(block.file).stem}]({block.file})", "", f"*{block.caption}*"]
            elif isinstance(block, list):
                lines += [f"- {item}" for item in block]
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escape ``text`` and turn its Markdown ``**bold**``, ```code``` and ``[links](relative/path)`` into HTML."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text, quote=False))
    text = re.sub(r"\[([^\]]+)\]\(([^)\s\"]+)\)", r'<a href="\2">\1</a>', text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def render_html(title: str, sections: Sequence[Section]) -> str:
    def cell(item: Cell) -> str:
        sort = "" if item.sort is None else html.escape(str(item.sort))
        numeric = ' class="num"' if item.sort is not None and not isinstance(item.sort, str) else ""
        text = re.sub(r" (\[[^\]]*\])$", r' <span class="ci">\1</span>', html.escape(item.text))
        return f'<td data-sort="{sort}"{numeric}>{f"<b>{text}</b>" if item.bold else text}</td>'

    def block_html(block: Block) -> str:
        if isinstance(block, Table):
            header = "".join(f"<th>{html.escape(name)}</th>" for name in block.header)
            body = "\n".join("<tr>" + "".join(map(cell, row)) + "</tr>" for row in block.rows)
            table = f'<table class="sortable"><thead><tr>{header}</tr></thead>\n<tbody>{body}</tbody></table>'
            return f'<div class="scroll">{table}</div>'
        if isinstance(block, Plot):
            caption = html.escape(block.caption)
            file = html.escape(block.file)
            image = f'<a href="{file}"><img src="{file}" alt="{caption}"></a>'
            return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"
        if isinstance(block, list):
            return "<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in block) + "</ul>"
        return f"<p>{_inline_html(block)}</p>"

    body = []
    for heading, blocks in sections:
        content = "\n".join(map(block_html, blocks))
        if any(isinstance(block, Plot) for block in blocks):
            content = f'<div class="plots">{content}</div>'
        body.append(f"<section><h2>{html.escape(heading)}</h2>\n{content}</section>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(body)
        + f"\n<script>{_SORT_SCRIPT}</script></body></html>\n"
    )
