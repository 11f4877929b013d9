"""benchmarks.fewshot_screen: its decisions follow the numbers it measures, on synthetic features; its development
sets share no image or patient with the sets fewshot_accuracy reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import fewshot_accuracy, fewshot_screen
from benchmarks.fewshot_screen import BASELINE, TRANSFORMS, Pool, TransformPrototype, decide, run_screen
from benchmarks.results_md import summarise_fewshot_screen
from tests.conftest import SHARED_DATA
from tlfusion.fewshot.evaluation import PrototypeClassifier

SEPARATION = {1: 0.1, 2: 1.2, 3: 0.6, 4: 0.3}  # stages=2 carries the most class signal


def synthetic_pools() -> dict[str, Pool]:
    labels = np.repeat(["neg", "pos"], 40)  # 20 of 40 patients per class in an episode: none in all of them
    return {name: Pool(labels, np.array([f"{name}{i}" for i in range(80)])) for name in ("dev_a", "dev_b")}


def synthetic_features(name: str, extractor: str, stages: int) -> np.ndarray:
    """Non-negative features whose class shift grows with SEPARATION[stages]; one seed per (set, extractor, stages)."""
    rng = np.random.default_rng([len(name), len(extractor), stages, ord(name[-1])])
    shift = np.r_[np.zeros(40), np.ones(40)][:, None] * SEPARATION[stages] * np.eye(12)[0]
    return np.abs(rng.normal(1.0, 1.0, (80, 12)) + shift)


def test_screen_decides_the_stages_it_measured_best_and_renders():
    result = run_screen(synthetic_pools(), synthetic_features, ("a", "bb"), episodes=12, base=synthetic_features)
    means = {key: row["mean_auroc_all_classifiers"] for key, row in result["stages"].items()}
    assert set(means) == {"1", "2", "3", "4"}
    assert max(means, key=means.get) == "2" and result["decisions"]["stages"] == 2
    assert means["2"] > means["1"] + 0.1  # the synthetic signal is visible, so the decision is not a tie-break
    assert set(result["transforms"]) == set(TRANSFORMS)
    best = max(row["mean_auroc"] for row in result["transforms"].values())
    gain = result["decisions"]["best_transform_gain_over_l2_prototype"]
    assert gain == pytest.approx(best - result["transforms"][BASELINE]["mean_auroc"], abs=1e-4)
    assert result["transforms"][BASELINE]["gain_ci95"] == [0.0, 0.0]  # the baseline against itself
    low, high = result["transforms"]["power 0.5 + l2"]["gain_ci95"]
    assert low < result["transforms"]["power 0.5 + l2"]["gain_over_l2_prototype"] < high
    payload = {"settings": {"development_sets": {"dev_a": 80, "dev_b": 80}}, **result}
    titles = [title for title, _, _ in summarise_fewshot_screen(payload)]
    assert titles == ["stages (development sets only)", "transforms at the decided stages", "decisions"]


@pytest.mark.parametrize(
    ("gain", "low", "adopted"),
    [(0.004, 0.001, "none"), (0.006, 0.001, "power 0.5 + l2"), (0.006, -0.002, "none")],
    ids=["below-margin", "adopted", "ci-spans-0"],
)
def test_a_transform_is_adopted_only_beyond_the_margin_and_its_interval(gain, low, adopted):
    stages = {"1": {"mean_auroc_all_classifiers": 0.7}, "2": {"mean_auroc_all_classifiers": 0.7}}
    row = {"mean_auroc": 0.75 + gain, "gain_over_l2_prototype": gain, "gain_ci95": [low, 2 * gain - low]}
    transforms = {BASELINE: {"mean_auroc": 0.75, "gain_over_l2_prototype": 0.0, "gain_ci95": [0, 0]}}
    decisions = decide(stages, {**transforms, "power 0.5 + l2": row})
    assert decisions["transform"] == adopted
    assert decisions["best_transform"] == "power 0.5 + l2"
    assert decisions["stages"] == 1  # a tie goes to fewer stages


def test_plain_transform_is_the_cosine_prototype():
    rng = np.random.default_rng(0)
    supports, queries, labels = rng.normal(size=(10, 6)), rng.normal(size=(30, 6)), np.repeat([0, 1], 5)
    ours = TransformPrototype().fit(supports, labels).predict_log_proba(queries)
    library = PrototypeClassifier(metric="cosine").fit(supports, labels).predict_log_proba(queries)
    np.testing.assert_allclose(ours, library, atol=1e-9)
    refined = TransformPrototype(steps=5, centring="episode").fit(supports, labels).predict_log_proba(queries)
    np.testing.assert_allclose(np.exp(refined).sum(axis=1), 1.0)


@pytest.mark.skipif(not (SHARED_DATA / "kermany_pneumonia").is_dir(), reason="needs the shared data sets")
def test_development_sets_share_no_image_or_patient_with_the_reported_sets():
    dev, reported = fewshot_screen.kermany_dev_table(), fewshot_accuracy.kermany_test_table()
    assert len(dev) > 400 and len(reported) > 100
    assert not set(dev["path"]) & set(reported["path"])
    assert not set(dev["patient"]) & set(reported["patient"])
    leg, hand = fewshot_screen.fracatlas_leg_table(), fewshot_accuracy.fracatlas_hand_table()
    assert set(leg["region"]) == {"leg"} and not set(leg["path"]) & set(hand["path"])
    assert not set(fewshot_screen.DEVELOPMENT) & set(fewshot_accuracy.DATASETS)


def test_fewshot_accuracy_records_the_screens_decisions(tmp_path, monkeypatch):
    monkeypatch.setattr(fewshot_accuracy, "SCREEN", tmp_path / "fewshot_screen.json")
    assert fewshot_accuracy.screen_record()["status"].startswith("not run")
    screen = {
        "machine": {"git": {"commit": "abc123"}},
        "settings": {"development_sets": {"kermany_dev": 512, "fracatlas_leg": 612}},
        "decisions": {"stages": 2, "transform": "none"},
    }
    (tmp_path / "fewshot_screen.json").write_text(json.dumps(screen))
    assert fewshot_accuracy.screen_record() == {
        "file": "fewshot_screen.json",
        "development_sets": ["kermany_dev", "fracatlas_leg"],
        "decisions": {"stages": 2, "transform": "none"},
        "commit": "abc123",
    }
