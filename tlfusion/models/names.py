"""Model names, `"<feature set>/<classifier>"` (e.g. `fusion/lr`, `densenet121/svm`), built and parsed here only."""

from __future__ import annotations

from typing import NamedTuple

FUSION = "fusion"
"""The feature set of every backbone's features fused."""


class ModelName(NamedTuple):
    """A feature set (one backbone's key, or `FUSION`) and a classifier name; `str()` gives the written form."""

    feature_set: str
    classifier: str

    @classmethod
    def parse(cls, name: str) -> ModelName:
        """`"densenet121/lr"` -> ModelName("densenet121", "lr"); a name without `/` is a feature set alone."""
        feature_set, _, classifier = str(name).partition("/")
        return cls(feature_set, classifier)

    @property
    def is_fusion(self) -> bool:
        return self.feature_set == FUSION

    def __str__(self) -> str:
        return f"{self.feature_set}/{self.classifier}" if self.classifier else self.feature_set
