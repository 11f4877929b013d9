"""The table of a pretraining run: several CSV sources, each split as its own experiment would split it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tlfusion.data.sources import read_csv
from tlfusion.data.splits import assign_splits
from tlfusion.pretraining_config import PretrainSource, PretrainSplit


def pretraining_table(
    sources: Sequence[PretrainSource],
    data_root: str | Path,
    split: PretrainSplit | None = None,
    drop_splits: Sequence[str] = ("test",),
) -> pd.DataFrame:
    """One table over several CSV sources with combined labels "<source>/<region>/<class>" ("<source>/<class>").

    Each source (each of its `regions` separately, when listed) is split by `data.splits.assign_splits(**split)`
    exactly as an experiment on that source alone would split it; rows in `drop_splits` are then removed, so
    the held-out test images of those experiments are never seen in pretraining.
    """
    split = split or PretrainSplit()
    parts = []
    for source in sources:
        for region in source.regions or [None]:
            part = assign_splits(_read_source(source, Path(data_root), region), **split.model_dump())
            part = part[~part["split"].isin(list(drop_splits))].copy()
            classes = part["label"].astype(str).map(lambda label, names=source.class_names: names.get(label, label))
            prefix = part["region"].map(lambda r, name=source.name: f"{name}/{r}/" if r else f"{name}/")
            part["label"] = prefix + classes
            part["source"] = source.name
            parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _read_source(source: PretrainSource, data_root: Path, region: str | None) -> pd.DataFrame:
    """The rows of `source` (of `region` only, when given)."""
    return read_csv(
        data_root / source.csv,
        path_column=source.path_column,
        label_column=source.label_column,
        patient_column=source.patient_column,
        region_column=source.region_column,
        filters={source.region_column: region} if region is not None else None,
    )
