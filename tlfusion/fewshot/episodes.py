"""Few-shot episodes: each draws ``ways`` classes, ``shots`` support images per class (one per patient) and
``queries`` query images per class (one per patient); support and query patients never overlap, so no patient is
seen on both sides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tlfusion.errors import InputError


@dataclass(frozen=True, eq=False)
class Episode:
    """One n-way k-shot task: row indices into the feature matrix and their labels, support rows first per class."""

    classes: np.ndarray
    support_idx: np.ndarray
    support_y: np.ndarray
    query_idx: np.ndarray
    query_y: np.ndarray


@dataclass(frozen=True)
class _ClassPool:
    """The rows of one class grouped by patient: rows ``rows[starts[p]:starts[p] + counts[p]]`` are patient p's."""

    patients: np.ndarray  # global patient codes, one per patient of this class
    rows: np.ndarray
    starts: np.ndarray
    counts: np.ndarray

    def one_row_each(self, rng: np.random.Generator, picked: np.ndarray) -> np.ndarray:
        """One random row for each picked patient (positions into ``patients``)."""
        offsets = (rng.random(len(picked)) * self.counts[picked]).astype(np.intp)
        return self.rows[self.starts[picked] + offsets]


def _class_pools(y: np.ndarray, patient_codes: np.ndarray) -> dict[object, _ClassPool]:
    pools = {}
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        rows = rows[np.argsort(patient_codes[rows], kind="stable")]
        patients, starts, counts = np.unique(patient_codes[rows], return_index=True, return_counts=True)
        pools[label] = _ClassPool(patients, rows, starts, counts)
    return pools


def _episode_classes(pools: dict[object, _ClassPool], ways: int, classes: Sequence | None) -> np.ndarray:
    available = np.array(list(pools))
    if ways < 2:
        raise InputError(f"fewshot: ways={ways} must be at least 2")
    if classes is None:
        if len(available) < ways:
            raise InputError(f"fewshot: ways={ways} but the labels have only {len(available)} classes")
        return available
    chosen = np.asarray(classes)
    unknown = [label for label in chosen.tolist() if label not in pools]
    if unknown:
        raise InputError(f"fewshot: classes {unknown} not in the labels (have {available.tolist()})")
    if len(np.unique(chosen)) != len(chosen) or len(chosen) != ways:
        raise InputError(f"fewshot: classes must be {ways} distinct labels (ways={ways}), got {chosen.tolist()}")
    return np.sort(chosen)


def check_positive(**counts: int) -> None:
    for name, value in counts.items():
        if int(value) != value or value < 1:
            raise InputError(f"fewshot: {name}={value} must be a positive integer")


def sample_episodes(
    y: Sequence,
    groups: Sequence,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int = 0,
    classes: Sequence | None = None,
) -> list[Episode]:
    """Draw ``episodes`` seeded n-way k-shot episodes whose support and query patients never overlap.

    Each class needs at least ``shots + queries`` patients (``groups`` holds one patient id per row):
    every support and every query image comes from a different patient. A patient labelled in several
    classes is kept out of the supports of one class when it is a query of another, and vice versa.
    ``classes`` fixes the episode's classes; otherwise ``ways`` classes are drawn at random per episode.
    """
    y, groups = np.asarray(y), np.asarray(groups)
    if y.ndim != 1 or groups.shape != y.shape:
        raise InputError(f"fewshot: labels ({y.shape}) and groups ({groups.shape}) must be 1-D of equal length")
    check_positive(shots=shots, queries=queries, episodes=episodes)
    patient_names, patient_codes = np.unique(groups, return_inverse=True)
    pools = _class_pools(y, patient_codes)
    candidates = _episode_classes(pools, ways, classes)
    needed = shots + queries
    for label in candidates.tolist():
        have = len(pools[label].patients)
        if have < needed:
            raise InputError(
                f"fewshot: class {label!r} has {have} patients, needs {needed} ({shots} shots + {queries} queries, "
                "one image per patient)"
            )
    rng = np.random.default_rng(seed)
    n_patients = len(patient_names)
    return [_sample_episode(rng, pools, candidates, ways, shots, queries, n_patients) for _ in range(episodes)]


def _sample_episode(
    rng: np.random.Generator,
    pools: dict[object, _ClassPool],
    candidates: np.ndarray,
    ways: int,
    shots: int,
    queries: int,
    n_patients: int,
) -> Episode:
    classes = np.sort(rng.choice(candidates, ways, replace=False)) if len(candidates) > ways else candidates
    in_support = np.zeros(n_patients, dtype=bool)
    in_query = np.zeros(n_patients, dtype=bool)
    support_idx, query_idx = [], []
    for label in classes.tolist():
        pool = pools[label]
        order = rng.permutation(len(pool.patients))
        support = order[~in_query[pool.patients[order]]][:shots]
        in_support[pool.patients[support]] = True
        query = order[~in_support[pool.patients[order]]][:queries]
        if len(support) < shots or len(query) < queries:
            raise InputError(
                f"fewshot: class {label!r} ran out of patients: too many of them also carry other labels "
                f"(needs {shots} support + {queries} query patients not shared with the episode's other classes)"
            )
        in_query[pool.patients[query]] = True
        support_idx.append(pool.one_row_each(rng, support))
        query_idx.append(pool.one_row_each(rng, query))
    support_y, query_y = np.repeat(classes, shots), np.repeat(classes, queries)
    return Episode(classes, np.concatenate(support_idx), support_y, np.concatenate(query_idx), query_y)
