"""The training table checked: its train and val rows, their classes, and the backbone's registry name."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from tlfusion.backbones import registry as backbones
from tlfusion.errors import InputError


def train_val_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The table's "train" and "val" rows: ValueError without the columns (a caller's mistake), InputError when
    either part is empty (the data or its split settings)."""
    missing = [column for column in ("path", "label", "split") if column not in table.columns]
    if missing:
        raise ValueError(f"training table: missing column(s) {missing}")  # the caller built a wrong table
    train = table[table["split"] == "train"].reset_index(drop=True)
    val = table[table["split"] == "val"].reset_index(drop=True)
    if train.empty:
        raise InputError("training table: no rows with split 'train'")
    if val.empty:
        raise InputError("training table: no rows with split 'val' (see data.splits.assign_splits)")
    return train, val


def require_classes(classes: Sequence[str], val: pd.DataFrame, what: str) -> None:
    """At least two training classes, and no validation label outside them."""
    if len(classes) < 2:
        raise InputError(f"{what}: the training rows have only one class ({list(classes)}); need at least two")
    unseen = sorted(set(val["label"].astype(str)) - set(classes))
    if unseen:
        raise InputError(f"{what}: validation label(s) {unseen} never occur in the training rows")


def architecture(name: str) -> str:
    """The registry name of `name` (InputError listing the known ones when unknown)."""
    backbones.get_spec(name)
    return name.lower()
