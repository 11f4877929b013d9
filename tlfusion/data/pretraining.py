"""The table of a pretraining run: several CSV sources, each split as its own experiment would split it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tlfusion.config.pretraining import PretrainSource, PretrainSplit
from tlfusion.data.images import file_sha256
from tlfusion.data.sources import read_csv
from tlfusion.data.splits import assign_splits

TARGET_PREFIX = "target:"
"""Columns `target:<source>/<column>` hold each source's head values (empty for rows of other sources)."""


def head_name(source: PretrainSource, column: str) -> str:
    """The name of `source`'s head over `column`: "<source>/<column>"."""
    return f"{source.name}/{column}"


def pretraining_table(
    sources: Sequence[PretrainSource],
    data_root: str | Path,
    split: PretrainSplit | None = None,
    drop_splits: Sequence[str] = ("test",),
) -> pd.DataFrame:
    """One table over several CSV sources with combined labels "<source>/<region>/<class>" ("<source>/<class>").

    Each source (each of its `regions` separately, when listed) is split by `data.splits.assign_splits` with its
    own `split` (else `split`) exactly as an experiment on that source alone would split it; rows in `drop_splits`
    are then removed, so the held-out test images of those experiments are never seen in pretraining. Every
    source's heads (`PretrainSource.heads`) are `TARGET_PREFIX` columns.
    """
    split = split or PretrainSplit()
    parts = []
    for source in sources:
        for region in source.regions or [None]:
            part = _split_source(_read_source(source, Path(data_root), region), source.split or split)
            part = part[~part["split"].isin(list(drop_splits))].copy()
            classes = part["label"].astype(str).map(lambda label, names=source.class_names: names.get(label, label))
            prefix = part["region"].map(lambda r, name=source.name: f"{name}/{r}/" if r else f"{name}/")
            part["label"] = prefix + classes
            part["source"] = source.name
            parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _split_source(rows: pd.DataFrame, split: PretrainSplit) -> pd.DataFrame:
    settings = split.model_dump()
    settings["test_values"] = tuple(settings["test_values"])
    return assign_splits(rows, **settings)


def _read_source(source: PretrainSource, data_root: Path, region: str | None) -> pd.DataFrame:
    """The rows of `source` (of `region` only, when given), with one `TARGET_PREFIX` column per head."""
    filters = {**source.filters, **({source.region_column: region} if region is not None else {})}

    def read(label_column: str) -> pd.DataFrame:
        return read_csv(
            data_root / source.csv,
            path_column=source.path_column,
            label_column=label_column,
            patient_column=source.patient_column,
            split_column=source.split_column,
            region_column=source.region_column,
            filters=filters or None,
        )

    rows = read(source.label_column)
    rows["sha256"] = [file_sha256(path) for path in rows["path"]]  # identical files stay in one part, as in a run
    for head in source.heads:
        values = rows["label"] if head.column == source.label_column else read(head.column)["label"]
        rows[TARGET_PREFIX + head_name(source, head.column)] = values.to_numpy()
    return rows
