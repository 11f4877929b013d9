"""Few-shot intervals over patients (tlfusion.fewshot.intervals): calibrated against independent pools, wide where
patients are few, not estimable where a patient is in every episode."""

from __future__ import annotations

import numpy as np
import pytest

from tlfusion.fewshot.episodes import sample_episodes
from tlfusion.fewshot.evaluation import evaluate_episodes, run_fewshot
from tlfusion.fewshot.intervals import episode_membership, patient_jackknife_variance
from tlfusion.fewshot.intervals import patient_se as patient_se_of


def pool(rng: np.random.Generator, patients: int, images: int, spread: float, shift: float = 0.6):
    """Two classes of ``patients`` patients; each patient's images scatter (sd 1) around a patient centre drawn
    with sd ``spread`` around its class centre (class centres ``shift`` apart)."""
    y = np.repeat(["a", "b"], patients * images)
    groups = np.repeat([f"p{i}" for i in range(2 * patients)], images)
    centres = rng.normal(size=(2 * patients, 8)) * spread
    centres[patients:, 0] += shift
    return np.repeat(centres, images, axis=0) + rng.normal(size=(len(y), 8)), y, groups


def half_width(interval: list[float]) -> float:
    return (interval[1] - interval[0]) / 2


def test_patient_interval_matches_the_spread_over_independent_pools():
    """The mean over 200 episodes of one pool varies from pool to pool far more than 1.96·std/√episodes says;
    the patient interval's SE follows the real spread (slightly wide), the episode-only SE is far too small."""
    rng = np.random.default_rng(1)
    means, patient_se, episode_se = [], [], []
    for seed in range(30):
        X, y, groups = pool(rng, patients=8, images=2, spread=1.0)
        episodes = sample_episodes(y, groups, 2, 2, 2, 200, seed=seed)
        auroc = evaluate_episodes(X, y, episodes, "prototype", groups=groups)["auroc"]
        assert auroc["ci95"][0] < auroc["mean"] < auroc["ci95"][1]
        scores = np.asarray(auroc["per_episode"])
        means.append(scores.mean())
        patient_se.append(patient_se_of(scores, episode_membership(episodes, groups)))  # unclipped
        episode_se.append(half_width(auroc["episode_ci95"]) / 1.96)
    spread = np.std(means, ddof=1)
    assert 0.8 < np.mean(patient_se) / spread < 2.0
    assert np.mean(episode_se) / spread < 0.5


def test_few_patients_with_many_images_widen_the_interval():
    """6 patients per class with 30 images each: 1,000 episodes reuse the same 12 patients, so the interval over
    patients is many times the episode-only one; the same images as 360 one-image patients are not clustered."""
    X, y, groups = pool(np.random.default_rng(2), patients=6, images=30, spread=2.0, shift=1.0)
    clustered = run_fewshot(X, y, groups, 2, 1, 1, 1000, "prototype")
    assert half_width(clustered["auroc"]["ci95"]) > 3 * half_width(clustered["auroc"]["episode_ci95"])  # 4.3x here
    assert clustered["interval"]["patients"] == 12 and clustered["interval"]["estimable"]
    assert clustered["per_class"]["a"] == {"images": 180, "patients": 6}
    one_image_each = run_fewshot(X, y, np.arange(len(y)).astype(str), 2, 1, 1, 1000, "prototype")
    assert half_width(one_image_each["auroc"]["ci95"]) < half_width(clustered["auroc"]["ci95"]) / 2


def test_a_patient_in_every_episode_makes_the_interval_not_estimable():
    """2 patients per class, 1 shot + 1 query: every episode holds all 4 patients, nothing is ever left out."""
    X, y, groups = pool(np.random.default_rng(3), patients=2, images=40, spread=1.0)
    record = run_fewshot(X, y, groups, 2, 1, 1, 500, "prototype")
    for metric in ("auroc", "accuracy"):
        assert record[metric]["ci95"] is None
        assert half_width(record[metric]["episode_ci95"]) < 0.1  # the naive interval claims a precise answer
        assert record[metric]["episode_std"] > 0
    assert record["interval"]["estimable"] is False
    assert "4 patient(s) are in every episode" in record["interval"]["reason"]
    assert record["per_class"]["a"]["patients"] == 2


def test_jackknife_is_the_leave_one_patient_out_formula():
    X, y, groups = pool(np.random.default_rng(4), patients=5, images=2, spread=1.0)
    episodes = sample_episodes(y, groups, 2, 1, 2, 40, seed=0)
    scores = np.asarray(evaluate_episodes(X, y, episodes, "prototype")["auroc"]["per_episode"])
    membership = episode_membership(episodes, groups)
    patients = np.unique(groups)
    assert membership.shape == (40, 10)
    for row, episode in enumerate(episodes):
        rows = np.concatenate([episode.support_idx, episode.query_idx])
        assert set(patients[membership[row]]) == set(groups[rows])
    left_out = [scores[~membership[:, p]].mean() for p in range(len(patients))]
    expected = (len(patients) - 1) / len(patients) * np.sum((np.array(left_out) - np.mean(left_out)) ** 2)
    assert patient_jackknife_variance(scores, membership) == pytest.approx(expected, rel=1e-12)


def test_evaluate_episodes_without_groups_gives_no_patient_interval():
    X, y, groups = pool(np.random.default_rng(5), patients=6, images=2, spread=1.0)
    episodes = sample_episodes(y, groups, 2, 2, 2, 20)
    assert evaluate_episodes(X, y, episodes, "prototype")["auroc"]["ci95"] is None
    assert evaluate_episodes(X, y, episodes, "prototype", groups=groups)["auroc"]["ci95"] is not None


def test_results_md_names_the_interval_and_the_patients():
    from benchmarks.results_md import summarise_fewshot_accuracy

    patient = {"mean": 0.8, "ci95": [0.7, 0.9], "episode_ci95": [0.79, 0.81], "episode_std": 0.1}
    missing = {**patient, "ci95": None}
    block = {"counts": {"covid": {"images": 61, "patients": 56}, "normal": {"images": 21, "patients": 21}}}
    new = {"datasets": {"covid": {**block, "results": {"fusion": {"a": {"auroc": patient}, "b": {"auroc": missing}}}}}}
    (title, header, rows), *_ = summarise_fewshot_accuracy(new)
    assert title == "covid: episode AUROC [95% CI over patients]; patients per class: covid 56, normal 21"
    assert rows == [["fusion", "0.8 [0.7, 0.9]", "0.8 (no patient CI)"]]
    old = {
        "datasets": {"covid": {**block, "results": {"fusion": {"a": {"auroc": {"mean": 0.8, "ci95": [0.79, 0.81]}}}}}}
    }
    assert "episodes only, patients ignored" in summarise_fewshot_accuracy(old)[0][0]
