"""Few-shot evaluation speed: episodes per second for each classifier on synthetic cached features.

    python -m benchmarks.fewshot_speed [--quick]

Writes benchmarks/results/fewshot_speed.json. Features are synthetic (n=800, d=1024, 4 classes, 2 images per
patient); timings are single-threaded (BLAS/OpenMP limited to 1 thread), median over 3 repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks._common import machine_info, write_result
from tlfusion.fewshot.episodes import sample_episodes
from tlfusion.fewshot.evaluation import FEWSHOT_CLASSIFIERS, evaluate_episodes

N_ROWS, N_FEATURES, N_CLASSES, IMAGES_PER_PATIENT = 800, 1024, 4, 2
WAYS, SHOTS, QUERIES, REPEATS = 2, 5, 15, 3
T = TypeVar("T")


def synthetic_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-negative float32 features (like pooled ReLU activations) with a weak class signal (2-way 5-shot
    prototype AUROC about 0.7), plus labels and patient ids."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, N_ROWS // IMAGES_PER_PATIENT).repeat(IMAGES_PER_PATIENT)
    patients = np.arange(N_ROWS // IMAGES_PER_PATIENT).repeat(IMAGES_PER_PATIENT)
    centres = rng.gamma(2.0, 0.5, size=N_FEATURES) + rng.normal(0.0, 0.2, size=(N_CLASSES, N_FEATURES))
    X = np.abs(centres[labels] + rng.normal(0.0, 1.5, size=(N_ROWS, N_FEATURES)))
    return X.astype(np.float32), labels, patients


def timed(task: Callable[[], T]) -> tuple[float, T]:
    """Median wall-clock seconds of ``task`` over REPEATS runs, and its last result."""
    timings = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = task()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings), result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 episodes instead of 1000")
    episodes = 100 if parser.parse_args(argv).quick else 1000
    machine = machine_info("numpy", "scikit-learn", "threadpoolctl")
    X, y, groups = synthetic_features()
    rows = []
    with threadpool_limits(limits=1):
        sampling_s, sampled = timed(lambda: sample_episodes(y, groups, WAYS, SHOTS, QUERIES, episodes, seed=0))
        for name in FEWSHOT_CLASSIFIERS:
            seconds, scores = timed(lambda name=name: evaluate_episodes(X, y, sampled, name))
            auroc = scores["auroc"]["mean"]
            rows.append({"classifier": name, "seconds": seconds, "episodes_per_s": episodes / seconds, "auroc": auroc})
            print(f"{name:>17}: {episodes / seconds:9.0f} episodes/s  (AUROC {auroc:.3f} on synthetic data)")
    print(f"{'sampling':>17}: {episodes / sampling_s:9.0f} episodes/s")
    result = {
        "benchmark": "fewshot_speed",
        "machine": machine,
        "settings": {
            "n": N_ROWS,
            "d": N_FEATURES,
            "classes": N_CLASSES,
            "images_per_patient": IMAGES_PER_PATIENT,
            "ways": WAYS,
            "shots": SHOTS,
            "queries": QUERIES,
            "episodes": episodes,
            "repeats": REPEATS,
            "statistic": "median",
            "threads": 1,
            "quick": episodes == 100,
        },
        "sampling": {"seconds": sampling_s, "episodes_per_s": episodes / sampling_s},
        "classifiers": rows,
    }
    print(f"wrote {write_result('fewshot_speed', result)}")
    return result


if __name__ == "__main__":
    main()
