"""The fusion model a bundle holds: backbones, then fusion + classifier, from images to class probabilities."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
from sklearn.pipeline import Pipeline

from tlfusion.backbones.registry import FEATURES_LAYER, image_size_of
from tlfusion.bundle.ood import FeatureDistance
from tlfusion.data.images import decoded_batches
from tlfusion.errors import InputError
from tlfusion.evaluation.calibration import Calibrator
from tlfusion.features.fusion import FeatureFusion, fuse
from tlfusion.features.onnx_graphs import BatchRunner
from tlfusion.features.runners import assemble_runner
from tlfusion.models.classifiers import CLASSIFIER_STEP, FUSION_STEP

logger = logging.getLogger(__name__)


PREDICT_BATCH = 64


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


MULTICLASS = "multiclass"
"""bundle.json's `task` for a K-class bundle (binary bundles have no `task`)."""
"""bundle.json keys that bundles written before them lack (read as the Bundle field's default)."""


@dataclass
class Bundle:
    """Everything needed to go from images to class probabilities: backbones, then `estimator`, the fitted
    `models.classifiers.fusion_pipeline` (feature fusion + classifier, as cross-validated and refitted by the fit
    stage).

    `onnx_graphs` maps backbone names to their feature sub-model as ONNX (see `onnx_graphs.onnx_graph`); those
    backbones run with ONNX Runtime, the others with Keras. `ood` scores how unlike the training images an image's
    features are (None in bundles saved without it). `calibration` recalibrates the estimator's probabilities (None:
    used as they are). `trust` is set by `load_bundle`: "signed ..." or
    "integrity only ..." (see `tlfusion.bundle.signing`).
    """

    models: dict[str, keras.Model]
    estimator: Pipeline
    threshold: float | None
    """Binary: P(positive) at or above it is positive. K-class: None (the most probable class is predicted)."""
    class_names: list[str]
    image_size: int
    clahe: bool = False
    flip: bool = False
    meta: dict = field(default_factory=dict)
    onnx_graphs: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    ood: FeatureDistance | None = field(default=None, repr=False, compare=False)
    calibration: Calibrator | None = field(default=None, repr=False, compare=False)
    ordinal: bool = False
    """K-class bundles: the classes are ordered grades."""
    trust: str = field(default="", compare=False)
    _runners: dict[str, BatchRunner] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.models:
            raise InputError("bundle: needs at least one backbone")
        for name, model in self.models.items():
            check_backbone_name(name, "bundle")
            if FEATURES_LAYER not in {layer.name for layer in model.layers}:
                raise InputError(f"bundle: backbone {name!r} has no '{FEATURES_LAYER}' layer")
            if image_size_of(model) != self.image_size:
                raise InputError(f"bundle: backbone {name!r} takes {image_size_of(model)} px, not {self.image_size}")
        self._check_classes()
        unknown = sorted(set(self.onnx_graphs) - set(self.models))
        if unknown:
            raise InputError(f"bundle: ONNX graphs for unknown backbones {unknown}")
        steps = [name for name, _ in getattr(self.estimator, "steps", [])]
        if not isinstance(self.estimator, Pipeline) or steps != [FUSION_STEP, CLASSIFIER_STEP]:
            raise InputError(f"bundle: the estimator must be a Pipeline of {FUSION_STEP!r} and {CLASSIFIER_STEP!r}")
        width = getattr(self.fusion, "n_features_in_", None)
        if self.ood is not None and len(self.ood.center) != width:
            raise InputError(
                f"bundle: out-of-distribution calibration for {len(self.ood.center)} features, not {width}"
            )

    def _check_classes(self) -> None:
        """Binary: [negative, positive], a threshold in [0, 1] and a classifier of labels 0, 1. K-class: K >= 3
        distinct names, no threshold, a classifier of codes 0..K-1."""
        names, K = self.class_names, len(self.class_names)
        if K == 2:
            if self.threshold is None or not 0.0 <= float(self.threshold) <= 1.0:
                raise InputError(f"bundle: threshold must be in [0, 1]; got {self.threshold}")
        elif K < 2 or len(set(names)) != K:
            raise InputError(f"bundle: class_names must be [negative, positive] or K >= 3 distinct names; got {names}")
        elif self.threshold is not None:
            raise InputError(f"bundle: a {K}-class bundle predicts the most probable class; its threshold must be None")
        if self.ordinal and K == 2:
            raise InputError("bundle: ordinal is for bundles of 3 or more classes")
        if list(getattr(self.classifier, "classes_", [])) != list(range(K)):
            what = "labels 0 (negative) and 1 (positive)" if K == 2 else f"class codes 0..{K - 1}"
            raise InputError(f"bundle: the classifier must be fitted on {what}")

    @property
    def task(self) -> Literal["binary", "multiclass"]:
        """ "binary" or "multiclass"."""
        return "binary" if len(self.class_names) == 2 else MULTICLASS

    @property
    def fusion(self) -> FeatureFusion:
        return self.estimator.named_steps[FUSION_STEP]

    @property
    def classifier(self) -> Any:
        return self.estimator.named_steps[CLASSIFIER_STEP]

    def features(self, images: np.ndarray) -> np.ndarray:
        """The backbones' features of images [n, s, s, 1] (float, [0, 255]) side by side: the estimator's input."""
        images = self._check_images(images)
        X, _ = fuse([self._backbone_features(name, images) for name in self.models])
        return X

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [n, K] in `class_names` order ((negative, positive) when binary) for images [n, s, s, 1]."""
        return self.probabilities(self.features(images))

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        """The estimator's probabilities [n, K] for features X (`features`), recalibrated when the bundle is."""
        prob = self.estimator.predict_proba(X)
        return prob if self.calibration is None else self.calibration.apply(prob)

    def assess(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`predict_proba` and each image's out-of-distribution score (`bundle.ood.FeatureDistance.score`: above 1,
        further from the training images than 99 % of them), or None when the bundle has no calibration."""
        X = self.features(images)
        return self.probabilities(X), None if self.ood is None else self.ood.score(X)

    def predict_paths(self, paths: Sequence[str | Path], batch_size: int = 32) -> np.ndarray:
        """Probabilities [n, K] for image files (decoded as the bundle's backbones expect)."""
        return np.concatenate([self.predict_proba(batch) for batch in self._decoded(paths, batch_size)])

    def assess_paths(self, paths: Sequence[str | Path], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """`assess` for image files."""
        prob, scores = zip(*(self.assess(batch) for batch in self._decoded(paths, batch_size)), strict=True)
        return np.concatenate(prob), None if self.ood is None else np.concatenate(scores)

    def _decoded(self, paths: Sequence[str | Path], batch_size: int) -> Iterator[np.ndarray]:
        if len(paths) == 0:
            raise InputError("paths: no images to predict")
        return decoded_batches(paths, self.image_size, self.clahe, batch_size)

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[-1] != 1:
            raise InputError(f"images must be [n, size, size, 1]; got shape {images.shape}")
        if images.shape[1:3] != (self.image_size, self.image_size):
            size = images.shape[1] if images.shape[1] == images.shape[2] else f"{images.shape[1]}x{images.shape[2]}"
            raise InputError(f"image size {size} differs from the bundle's {self.image_size}")
        return images

    def _backbone_features(self, name: str, images: np.ndarray) -> np.ndarray:
        if name not in self._runners:
            graph = self.onnx_graphs.get(name) or None
            run, size = assemble_runner(graph, None if graph else self.models[name], flip=self.flip)
            if size != self.image_size:
                raise InputError(f"bundle: backbone {name!r} ONNX graph takes {size} px, not {self.image_size}")
            self._runners[name] = run
        run = self._runners[name]
        return np.concatenate([run(images[i : i + PREDICT_BATCH]) for i in range(0, len(images), PREDICT_BATCH)])


def check_backbone_name(name: Any, where: str) -> None:
    """Raise InputError unless `name` can name files in a bundle: letters, digits, '_', '-', '.', no '..'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InputError(f"{where}: backbone name {name!r} must be letters, digits, '_', '-' or '.' (no '..')")


def check_class_names(bundle: Bundle, names: Sequence[str]) -> None:
    """Raise InputError unless `names` ([negative, positive], or K classes in order) are the bundle's class names."""
    if list(names) != list(bundle.class_names):
        raise InputError(f"data classes {list(names)} differ from the bundle's {bundle.class_names}")
