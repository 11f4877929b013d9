"""The heads of a multi-task pretraining run: one slice of the backbone's `head` layer per source target, and the
target matrix the masked loss (`training.pretraining_losses.MultiTaskLoss`) reads, NaN where a row's source lacks a
label."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd

from tlfusion.config.pretraining import PretrainSource
from tlfusion.data.pretraining import TARGET_PREFIX, head_name
from tlfusion.errors import InputError


@dataclass(frozen=True)
class Head:
    """One target: `size` logits from `offset` in the head layer; classes (softmax) or a standardised number."""

    name: str
    kind: Literal["classes", "regression"]
    offset: int
    size: int
    classes: tuple[str, ...] = ()
    mean: float = 0.0
    std: float = 1.0

    def as_config(self) -> dict:
        """Plain JSON values (for Keras configs and train.json)."""
        return {**asdict(self), "classes": list(self.classes)}


def head_layout(sources: Sequence[PretrainSource], train: pd.DataFrame) -> tuple[Head, ...]:
    """The heads of `sources`, in order; classes and regression statistics from the training rows."""
    heads, offset = [], 0
    for source in sources:
        for target in source.heads:
            name = head_name(source, target.column)
            values = train.loc[train["source"] == source.name, TARGET_PREFIX + name]
            build = _classes_head if target.kind == "classes" else _number_head
            head = build(name, offset, values)
            heads.append(head)
            offset += head.size
    return tuple(heads)


def _classes_head(name: str, offset: int, values: pd.Series) -> Head:
    classes = tuple(sorted(values.dropna().astype(str).unique()))
    if len(classes) < 2:
        raise InputError(f"pretraining head {name!r}: the training rows have {len(classes)} class(es); need two")
    return Head(name, "classes", offset, len(classes), classes)


def _number_head(name: str, offset: int, values: pd.Series) -> Head:
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any() or len(numbers) < 2:
        raise InputError(f"pretraining head {name!r}: regression targets must be numbers (at least two rows)")
    return Head(name, "regression", offset, 1, mean=float(numbers.mean()), std=float(numbers.std() or 1.0))


def head_targets(rows: pd.DataFrame, heads: Sequence[Head]) -> np.ndarray:
    """[rows, heads] float32: class index or standardised value per head, NaN where the row has no label."""
    targets = np.full((len(rows), len(heads)), np.nan, dtype=np.float32)
    for column, head in enumerate(heads):
        values = rows[TARGET_PREFIX + head.name]
        present = values.notna().to_numpy()
        if head.kind == "classes":
            index = {name: i for i, name in enumerate(head.classes)}
            coded = values[present].astype(str).map(index)
            if coded.isna().any():
                unseen = sorted(set(values[present].astype(str)) - set(head.classes))
                raise InputError(f"pretraining head {head.name!r}: label(s) {unseen} never occur in the training rows")
            targets[present, column] = coded.to_numpy(np.float32)
        else:
            targets[present, column] = (pd.to_numeric(values[present]).to_numpy() - head.mean) / head.std
    return targets


def output_names(heads: Sequence[Head]) -> list[str]:
    """One name per head-layer unit: "<head>=<class>" for classes, "<head>" for a number."""
    return [name for head in heads for name in ([f"{head.name}={c}" for c in head.classes] or [head.name])]
