"""Few-shot intervals that treat patients, not episodes, as the sampled units.

Episodes drawn from one pool share its patients, so 1,000 episodes are not 1,000 independent observations: the
mean over episodes estimates the AUROC *for this pool's patients*, and 1.96·std/√episodes (``episode_ci95``) only
says how precisely the episodes pin that number down. ``ci95`` is the interval for new patients from the same
population. The mean over episodes is an (incomplete) U-statistic of the pool's patients; its variance is
estimated from the per-episode scores by reweighting them by patient membership, with no re-scoring:

1. leave-one-patient-out jackknife (Arvesen 1969, the usual variance estimator for U-statistics):
   theta_(-p) = mean score of the episodes without patient p (in support or query),
   J(episodes) = (N - 1) / N * sum_p (theta_(-p) - mean_p theta_(-p))^2   (N: patients in the evaluated pool);
2. J also counts the episode-sampling noise again, in proportion to 1/episodes; that part is removed by
   extrapolating to infinitely many episodes from J on all episodes and on each half: J_inf = 2 J(all) -
   (J(first half) + J(second half)) / 2, floored at 0 (the uncorrected J(all) when a half is not estimable);
3. var = J_inf + std² / episodes (the episode-sampling noise of this many episodes, counted once);
   ci95 = mean ± 1.96 * sqrt(var), clipped to [0, 1].

Simulated with 40 independent pools each (Gaussian patients; 8, 21 and 60 patients per class; 2+2, 5+5 and 5+15
shots+queries; 200-1000 episodes; the first is tests/fewshot/test_fewshot_intervals.py), this SE was 1.1-1.6 times the
true spread of the mean over pools, the episode-only SE 0.1-0.3 times it. When some patient is in every episode (e.g.
2 patients per class with 1 shot + 1 query) nothing is left out: the patient interval is not estimable and ``ci95``
is None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Z95 = 1.96
METHOD = (
    "leave-one-patient-out jackknife of the per-episode scores, episode noise extrapolated out, plus std²/episodes; "
    "mean ± 1.96·SE clipped to [0, 1] (tlfusion.fewshot.intervals)"
)


def episode_membership(episodes: Sequence[Any], groups: Sequence) -> np.ndarray:
    """Boolean [episodes, patients]: which patients of the pool (``np.unique(groups)``) each episode uses."""
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    membership = np.zeros((len(episodes), int(codes.max()) + 1 if len(codes) else 0), dtype=bool)
    for row, episode in enumerate(episodes):
        membership[row, codes[np.concatenate([episode.support_idx, episode.query_idx])]] = True
    return membership


def episode_interval(scores: np.ndarray) -> list[float]:
    """mean ± 1.96·std/√episodes: the precision of the mean over these episodes for this pool's patients only."""
    half_width = Z95 * float(scores.std(ddof=1)) / float(np.sqrt(len(scores)))
    mean = float(scores.mean())
    return [mean - half_width, mean + half_width]


def patient_jackknife_variance(scores: np.ndarray, membership: np.ndarray) -> float | None:
    """Leave-one-patient-out jackknife variance of the mean score; None when a patient is in every episode."""
    used = membership.sum(axis=0)
    if (used == len(scores)).any():
        return None
    left_out = (scores.sum() - scores @ membership) / (len(scores) - used)
    patients = membership.shape[1]
    return float((patients - 1) / patients * ((left_out - left_out.mean()) ** 2).sum())


def patient_se(scores: np.ndarray, membership: np.ndarray) -> float | None:
    """Standard error of the mean score over new patients (module docstring, steps 1-3); None if not estimable."""
    full = patient_jackknife_variance(scores, membership)
    if full is None:
        return None
    half = len(scores) // 2
    halves = [patient_jackknife_variance(scores[part], membership[part]) for part in (slice(half), slice(half, None))]
    patients_only = full if None in halves else max(2.0 * full - (halves[0] + halves[1]) / 2.0, 0.0)
    return float(np.sqrt(patients_only + scores.var(ddof=1) / len(scores)))


def score_summary(scores: Sequence[float], membership: np.ndarray | None = None) -> dict:
    """Mean, the patient-level ``ci95`` (None without membership or when not estimable), the episode-only
    interval, the spread of the per-episode scores and the scores themselves."""
    values = np.asarray(scores, dtype=np.float64)
    mean = float(values.mean())
    se = None if membership is None else patient_se(values, membership)
    ci95 = None if se is None else [max(0.0, mean - Z95 * se), min(1.0, mean + Z95 * se)]
    return {
        "mean": mean,
        "ci95": ci95,
        "episode_ci95": episode_interval(values),
        "episode_std": float(values.std(ddof=1)),
        "per_episode": values.tolist(),
    }


def interval_note(membership: np.ndarray) -> dict:
    """How the intervals were made, and on how many patients: the ``interval`` block of ``fewshot.json``."""
    used = membership.sum(axis=0)
    always = int((used == len(membership)).sum())
    note = {
        "ci95": METHOD,
        "episode_ci95": "mean ± 1.96·std/√episodes (episodes as if independent: this pool's patients only)",
        "patients": int(membership.shape[1]),
        "patients_per_episode": float(membership.sum(axis=1).mean()),
        "estimable": always == 0,
    }
    if always:
        note["reason"] = f"{always} patient(s) are in every episode: too few patients per class for a patient interval"
    return note
