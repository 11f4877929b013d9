"""A backbone as a feature source: `ModelSource` (a model or its file, stages, flip) and its features' cache keys."""

from __future__ import annotations

import hashlib
import logging
from numbers import Integral
from pathlib import Path

import keras
import numpy as np

from tlfusion.backbones.registry import load_model_file
from tlfusion.data.images import file_sha256
from tlfusion.errors import InputError

logger = logging.getLogger(__name__)


class ModelSource:
    """A backbone given as a model or a `.keras` file, how many stages its features pool and whether they are
    flip-averaged: its keys now (`key`: the feature sub-model, `features_key`: its features), the Keras model only
    when needed."""

    def __init__(self, model: keras.Model | str | Path, stages: int = 1, flip: bool = False):
        if not isinstance(stages, Integral) or stages < 1:
            raise InputError(f"stages must be a positive integer; got {stages!r}")
        self.stages = int(stages)
        self.path: Path | None = None
        if isinstance(model, keras.Model):
            self._model: keras.Model | None = model
            key = weights_sha256(model)
        else:
            self.path = Path(model)
            if not self.path.is_file():
                raise InputError(f"{self.path}: model file not found")
            self._model = None
            key = file_sha256(self.path)
        # One-stage keys stay the plain model hash, so caches written before `stages` existed remain valid.
        self.key = key if self.stages == 1 else f"{key}-stages{self.stages}"
        self.flip = bool(flip)
        self.features_key = flipped_key(self.key, self.flip)

    @property
    def model(self) -> keras.Model:
        if self._model is None:
            self._model = load_model_file(self.path)
        return self._model


def weights_sha256(model: keras.Model) -> str:
    """Hex sha256 of a model's name, input shape and every weight (path, shape, dtype, values)."""
    digest = hashlib.sha256(f"{model.name}|{tuple(model.input.shape)}".encode())
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"|{weight.path}|{value.shape}|{value.dtype}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def flipped_key(key: str, flip: bool) -> str:
    """The key of a model's flip-averaged features (`key` itself without flipping, so older caches stay valid)."""
    return f"{key}-flip" if flip else key
