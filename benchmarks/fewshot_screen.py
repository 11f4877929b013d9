"""Few-shot screening on development sets only: the multi-scale feature count (``features.stages``) and feature
transforms the few-shot experiments ship with, measured on sets that benchmarks.fewshot_accuracy never reports.

    python -m benchmarks.fewshot_screen [--quick]

Development sets (no image, and no patient, of a set fewshot_accuracy reports):

- ``kermany_dev``: Kermany NORMAL vs PNEUMONIA, the train and val parts of the seed-0 patient-grouped split whose
  test part is fewshot_accuracy's ``kermany_test``;
- ``fracatlas_leg``: FracAtlas leg, fractured vs not (fewshot_accuracy reports hand).

Extractors: MobileNetV1 and MobileNetV2 with the offline ImageNet weights at 224 px and their fusion (per-block
L2), the start the few-shot experiments use. They never saw a radiograph. The in-domain backbones saw both sets in
pretraining, so the ImageNet vs in-domain choice cannot be screened here.

Screens (2-way 5-shot 15-query episodes, development seed 1, shared by every variant of a set):

- ``stages``: 1-4 pooled resolution stages, mean AUROC over both sets, the three extractors and every registered
  classifier (and the default ``prototype`` alone); the decision is the best mean over all classifiers.
- ``transforms`` at the decided stages: power 0.5, centring on the supports, the episode (transductive) or the NIH
  base set, and soft k-means prototype refinement (5 steps, temperature 10), against the plain L2-normalised
  prototype; one is adopted only when it beats that baseline by more than ``ADOPT_MARGIN`` mean AUROC and the
  95% CI over patients of that gain (same episodes, paired) lies above 0.

Writes benchmarks/results/fewshot_screen.json (``--quick``: fewshot_screen_quick.json) with its ``decisions``;
fewshot_accuracy records the full run's with its own results. Exits when a development image (by sha256) is in a
set fewshot_accuracy reports.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import log_softmax
from sklearn.base import BaseEstimator, ClassifierMixin

from benchmarks import fewshot_accuracy as accuracy
from benchmarks._common import machine_info, write_result
from tlfusion.data.images import file_sha256
from tlfusion.data.sources import read_csv
from tlfusion.data.splits import assign_splits, content_groups
from tlfusion.fewshot.episodes import sample_episodes
from tlfusion.fewshot.evaluation import FEWSHOT_CLASSIFIERS, evaluate_episodes
from tlfusion.fewshot.intervals import episode_membership, patient_se

WAYS, SHOTS, QUERIES, SEED = 2, 5, 15, 1
STAGES = (1, 2, 3, 4)
ADOPT_MARGIN = 0.005
BASELINE = "l2 prototype"
# name: (power, centring, soft k-means steps); centring is none, support, episode (transductive) or base (NIH)
TRANSFORMS = {
    BASELINE: (1.0, "none", 0),
    "l2 + support centring": (1.0, "support", 0),
    "l2 + episode centring (transductive)": (1.0, "episode", 0),
    "l2 + NIH base centring": (1.0, "base", 0),
    "power 0.5 + l2": (0.5, "none", 0),
    "power 0.5 + NIH base centring + l2": (0.5, "base", 0),
    "power 0.5 + episode centring + l2 + soft k-means": (0.5, "episode", 5),
    "l2 + episode centring + soft k-means": (1.0, "episode", 5),
}
FeatureFn = Callable[[str, str, int], np.ndarray]


@dataclass(frozen=True)
class Pool:
    """One development set: labels and patient groups per row."""

    y: np.ndarray
    groups: np.ndarray


# ---------------------------------------------------------------------------------------- data sets
def kermany_dev_table() -> pd.DataFrame:
    """The train and val parts of the Kermany split whose test part fewshot_accuracy reports."""
    table = read_csv(accuracy.DATA / "kermany_pneumonia" / "labels.csv", patient_column="patient_key")
    split = assign_splits(table, test_fraction=0.2, val_fraction=0.2, seed=0)
    return split[split["split"] != "test"].reset_index(drop=True)


def fracatlas_leg_table() -> pd.DataFrame:
    """FracAtlas leg, fractured ("1") vs not ("0")."""
    return read_csv(
        accuracy.DATA / "fracatlas" / "dataset.csv",
        label_column="fractured",
        region_column="primary_region",
        filters={"primary_region": "leg"},
    )


DEVELOPMENT: dict[str, Callable[[], pd.DataFrame]] = {
    "kermany_dev": kermany_dev_table,
    "fracatlas_leg": fracatlas_leg_table,
}


# ------------------------------------------------------------------------------------- transforms
class TransformPrototype(ClassifierMixin, BaseEstimator):
    """Prototype classifier on transformed features: power, centring, L2, then optional soft k-means refinement
    of the prototypes with the episode's queries (transductive)."""

    def __init__(self, power: float = 1.0, centring: str = "none", steps: int = 0, base_mean=None):
        self.power, self.centring, self.steps, self.base_mean = power, centring, steps, base_mean

    def fit(self, X, y) -> TransformPrototype:
        self.classes_, self.y_idx_ = np.unique(y, return_inverse=True)
        self.supports_ = np.sign(X) * np.abs(X) ** self.power
        return self

    def _centre(self, queries: np.ndarray) -> np.ndarray:
        if self.centring == "support":
            return self.supports_.mean(axis=0)
        if self.centring == "episode":
            return np.vstack([self.supports_, queries]).mean(axis=0)
        if self.centring == "base":
            return np.sign(self.base_mean) * np.abs(self.base_mean) ** self.power
        return np.zeros(self.supports_.shape[1])

    def predict_log_proba(self, X) -> np.ndarray:
        queries = np.sign(X) * np.abs(X) ** self.power
        centre = self._centre(queries)
        supports, queries = (accuracy.l2_rows(block - centre) for block in (self.supports_, queries))
        one_hot = np.eye(len(self.classes_))[self.y_idx_]
        prototypes = one_hot.T @ supports / one_hot.sum(axis=0)[:, None]
        for _ in range(self.steps):  # soft k-means: queries join the prototypes by their responsibilities
            responsibilities = np.exp(log_softmax(10.0 * queries @ accuracy.l2_rows(prototypes).T, axis=1))
            weights = np.vstack([one_hot, responsibilities])
            prototypes = weights.T @ np.vstack([supports, queries]) / weights.sum(axis=0)[:, None]
        return log_softmax(queries @ accuracy.l2_rows(prototypes).T, axis=1)  # softmax of minus cosine distance


# ------------------------------------------------------------------------------------------ screens
def episodes_of(pools: Mapping[str, Pool], episodes: int) -> dict[str, list]:
    """The episodes every variant of a set is scored on."""
    return {
        name: sample_episodes(p.y, p.groups, WAYS, SHOTS, QUERIES, episodes, seed=SEED) for name, p in pools.items()
    }


def mean_auroc(X: np.ndarray, pool: Pool, sampled: list, classifier) -> float:
    return evaluate_episodes(X, pool.y, sampled, classifier)["auroc"]["mean"]


def screen_stages(pools, features: FeatureFn, extractors, stages_list, episodes: int) -> dict:
    """Per stages value: mean AUROC over sets x extractors x registered classifiers, the prototype's alone, and
    the per-set means."""
    sampled, out = episodes_of(pools, episodes), {}
    for stages in stages_list:
        scores = {
            (name, extractor, classifier): mean_auroc(
                features(name, extractor, stages), pool, sampled[name], classifier
            )
            for name, pool in pools.items()
            for extractor in extractors
            for classifier in FEWSHOT_CLASSIFIERS
        }
        out[str(stages)] = {
            "mean_auroc_all_classifiers": float(np.mean(list(scores.values()))),
            "mean_auroc_prototype": float(np.mean([v for k, v in scores.items() if k[2] == "prototype"])),
            "per_set": {name: float(np.mean([v for k, v in scores.items() if k[0] == name])) for name in pools},
        }
    return out


def episode_aurocs(X: np.ndarray, pool: Pool, sampled: list, classifier) -> np.ndarray:
    return np.asarray(evaluate_episodes(X, pool.y, sampled, classifier)["auroc"]["per_episode"])


def screen_transforms(pools, features: FeatureFn, extractors, stages: int, episodes: int, base: FeatureFn | None):
    """Per transform: mean AUROC over sets x extractors (``base`` centring only when base features are given) and,
    against the plain L2 prototype on the same episodes, the gain with its 95% CI over patients (per set: the
    per-episode differences averaged over extractors, `tlfusion.fewshot.intervals.patient_se`; sets independent)."""
    sampled = episodes_of(pools, episodes)
    scores: dict[str, dict[str, np.ndarray]] = {}
    for label, (power, centring, steps) in TRANSFORMS.items():
        if centring == "base" and base is None:
            continue
        scores[label] = {}
        for name, pool in pools.items():
            per_extractor = []
            for extractor in extractors:
                base_mean = base(name, extractor, stages).mean(axis=0) if centring == "base" else None
                classifier = TransformPrototype(power, centring, steps, base_mean)
                per_extractor.append(episode_aurocs(features(name, extractor, stages), pool, sampled[name], classifier))
            scores[label][name] = np.mean(per_extractor, axis=0)
    membership = {name: episode_membership(sampled[name], pool.groups) for name, pool in pools.items()}
    return {label: transform_row(by_set, scores[BASELINE], membership) for label, by_set in scores.items()}


def transform_row(by_set: dict, baseline: dict, membership: dict) -> dict:
    """Mean AUROC, per-set means, and the gain over the baseline with its 95% CI over patients (None when not
    estimable)."""
    gains = {name: by_set[name] - baseline[name] for name in by_set}
    errors = [patient_se(gain, membership[name]) for name, gain in gains.items()]
    gain = float(np.mean([values.mean() for values in gains.values()]))
    se = None if None in errors else float(np.sqrt(np.sum(np.square(errors))) / len(errors))
    return {
        "mean_auroc": float(np.mean([values.mean() for values in by_set.values()])),
        "per_set": {name: float(values.mean()) for name, values in by_set.items()},
        "gain_over_l2_prototype": gain,
        "gain_ci95": None if se is None else [gain - 1.96 * se, gain + 1.96 * se],
    }


def best_stages(stages: dict) -> int:
    """The stages value with the best mean AUROC over all classifiers (the fewest stages on ties)."""
    return int(max(stages, key=lambda key: (round(stages[key]["mean_auroc_all_classifiers"], 6), -int(key))))


def decide(stages: dict, transforms: dict) -> dict:
    """``best_stages``; the transform with the best mean AUROC if it beats the plain L2 prototype by more than
    ADOPT_MARGIN with a gain CI above 0, else none."""
    best = max(transforms, key=lambda key: transforms[key]["mean_auroc"])
    row = transforms[best]
    adopted = best != BASELINE and row["gain_over_l2_prototype"] > ADOPT_MARGIN and (row["gain_ci95"] or [0])[0] > 0
    return {
        "stages": best_stages(stages),
        "transform": best if adopted else "none",
        "best_transform": best,
        "best_transform_gain_over_l2_prototype": round(row["gain_over_l2_prototype"], 4),
        "best_transform_gain_ci95": row["gain_ci95"],
    }


def run_screen(pools, features: FeatureFn, extractors, episodes: int, base: FeatureFn | None = None) -> dict:
    """Both screens and the decisions they give."""
    stages = screen_stages(pools, features, extractors, STAGES, episodes)
    transforms = screen_transforms(pools, features, extractors, best_stages(stages), episodes, base)
    return {"stages": stages, "transforms": transforms, "decisions": decide(stages, transforms)}


# ------------------------------------------------------------------------------------- real data
def imagenet_features(tables: Mapping[str, pd.DataFrame]) -> FeatureFn:
    """Cached ImageNet features per (set, extractor, stages); ``fusion`` is the per-block L2 concatenation."""
    cache: dict[tuple, np.ndarray] = {}

    def features(name: str, extractor: str, stages: int) -> np.ndarray:
        if extractor == "fusion":
            return np.hstack([accuracy.l2_rows(features(name, a, stages)) for a in accuracy.IMAGENET_ARCHITECTURES])
        key = (name, extractor, stages)
        if key not in cache:
            paths = list(tables[name]["path"])
            model = accuracy.imagenet_model(extractor)
            cache[key] = accuracy.features(model, paths, stages, accuracy.IMAGENET_SIZE)
        return cache[key]

    return features


def development_tables() -> dict[str, pd.DataFrame]:
    """The development sets with each file's sha256; exits when one shares an image with a reported set."""
    tables = {name: make() for name, make in DEVELOPMENT.items()}
    for table in tables.values():
        table["sha256"] = [file_sha256(path) for path in table["path"]]
    reported = {file_sha256(path) for make in accuracy.DATASETS.values() for path in make()["path"]}
    shared = {name: int(table["sha256"].isin(reported).sum()) for name, table in tables.items()}
    if any(shared.values()):
        raise SystemExit(f"development sets share images with the reported sets: {shared}")
    return tables


def pools_of(tables: Mapping[str, pd.DataFrame]) -> dict[str, Pool]:
    """Labels and patient groups per set (identical files under two ids: one patient)."""
    return {name: Pool(t["label"].astype(str).to_numpy(), content_groups(t)) for name, t in tables.items()}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 episodes instead of 300")
    quick = parser.parse_args(argv).quick
    episodes, started = (100 if quick else 300), time.perf_counter()
    tables = development_tables()
    base_paths = list(accuracy.base_table()["path"])
    features = imagenet_features({**tables, "nih_base": pd.DataFrame({"path": base_paths})})
    extractors = (*accuracy.IMAGENET_ARCHITECTURES, "fusion")
    result = run_screen(
        pools_of(tables), features, extractors, episodes, base=lambda _, e, s: features("nih_base", e, s)
    )
    payload = {
        "benchmark": "fewshot_screen",
        "machine": machine_info("tensorflow", "keras", "numpy", "scikit-learn"),
        "settings": {
            "development_sets": {name: len(table) for name, table in tables.items()},
            "extractors": list(extractors),
            "image_size": accuracy.IMAGENET_SIZE,
            "ways": WAYS,
            "shots": SHOTS,
            "queries": QUERIES,
            "episodes": episodes,
            "seed": SEED,
            "adopt_margin": ADOPT_MARGIN,
            "quick": quick,
        },
        **result,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    path = write_result("fewshot_screen_quick" if quick else "fewshot_screen", payload)
    print(f"decisions {result['decisions']}; wrote {path}")
    return payload


if __name__ == "__main__":
    main()
