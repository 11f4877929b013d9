"""Keras losses and metrics of pretraining: the masked multi-task loss over head slices, a per-head metric, and
the label-free NT-Xent loss over pairs of augmented views (registered, so checkpoints resume in safe mode)."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from tlfusion.training.pretraining_heads import Head


def _head_config(heads: Sequence[Head | dict]) -> list[dict]:
    return [head.as_config() if isinstance(head, Head) else dict(head) for head in heads]


def _masked_head_loss(head: dict, column, logits):
    """Per-row loss of one head (0 where the label is missing) and the mask."""
    present = ops.logical_not(ops.isnan(column))
    target = ops.where(present, column, ops.zeros_like(column))
    if head["kind"] == "classes":
        losses = keras.losses.sparse_categorical_crossentropy(ops.cast(target, "int32"), logits, from_logits=True)
    else:
        losses = ops.square(logits[:, 0] - target)
    return ops.where(present, losses, ops.zeros_like(losses)), ops.cast(present, logits.dtype)


@keras.saving.register_keras_serializable(package="tlfusion")
class MultiTaskLoss(keras.losses.Loss):
    """Sum over heads of the mean loss over the rows that have that head's label (softmax CE or squared error)."""

    def __init__(self, heads: Sequence[Head | dict], name: str = "multitask", **kwargs):
        super().__init__(name=name, **kwargs)
        self.heads = _head_config(heads)

    def call(self, y_true, y_pred):
        total = ops.zeros_like(y_pred[:, 0])
        for column, head in enumerate(self.heads):
            logits = y_pred[:, head["offset"] : head["offset"] + head["size"]]
            losses, present = _masked_head_loss(head, y_true[:, column], logits)
            total = total + losses * ops.cast(ops.shape(present)[0], losses.dtype) / ops.maximum(ops.sum(present), 1.0)
        return total  # per row: their batch mean is the sum of the heads' masked means

    def get_config(self) -> dict:
        return {"name": self.name, "heads": self.heads}


@keras.saving.register_keras_serializable(package="tlfusion")
class HeadMetric(keras.metrics.Metric):
    """One head's accuracy (classes) or mean absolute error in the target's own unit (regression), over the rows
    that have its label."""

    def __init__(self, head: Head | dict, column: int, name: str | None = None, **kwargs):
        self.head = _head_config([head])[0]
        self.column = column
        suffix = "accuracy" if self.head["kind"] == "classes" else "mae"
        super().__init__(name=name or f"{self.head['name'].replace('/', '_')}_{suffix}", **kwargs)
        self.total = self.add_variable((), initializer="zeros", name="total")
        self.count = self.add_variable((), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        column, head = y_true[:, self.column], self.head
        present = ops.logical_not(ops.isnan(column))
        target = ops.where(present, column, ops.zeros_like(column))
        logits = y_pred[:, head["offset"] : head["offset"] + head["size"]]
        if head["kind"] == "classes":
            scores = ops.cast(ops.equal(ops.argmax(logits, axis=-1), ops.cast(target, "int64")), "float32")
        else:
            scores = ops.abs(logits[:, 0] - target) * head["std"]
        mask = ops.cast(present, "float32")
        self.total.assign_add(ops.sum(ops.cast(scores, "float32") * mask))
        self.count.assign_add(ops.sum(mask))

    def result(self):
        return self.total / ops.maximum(self.count, 1.0)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self) -> dict:
        return {"name": self.name, "head": self.head, "column": self.column}


@keras.saving.register_keras_serializable(package="tlfusion")
class ContrastiveLoss(keras.losses.Loss):
    """NT-Xent (SimCLR) over a batch of views where rows 2i and 2i+1 are two views of one image; `y_true` unused."""

    def __init__(self, temperature: float = 0.2, name: str = "nt_xent", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature = float(temperature)

    def call(self, y_true, y_pred):
        embeddings = ops.normalize(ops.cast(y_pred, "float32"), axis=-1)
        similarity = ops.matmul(embeddings, ops.transpose(embeddings)) / self.temperature
        count = ops.shape(similarity)[0]
        similarity = similarity - 1e9 * ops.eye(count)  # a view is never its own positive
        index = ops.arange(count)
        partner = index + 1 - 2 * (index % 2)  # 0<->1, 2<->3, ...
        return keras.losses.sparse_categorical_crossentropy(partner, similarity, from_logits=True)

    def get_config(self) -> dict:
        return {"name": self.name, "temperature": self.temperature}
