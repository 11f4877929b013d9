"""Semantic metric learning on NIH ChestX-ray14 (1000 images, 64x64): BCE vs metric losses, and GZSL.

    python -m benchmarks.semantic_nih1000 [--data-dir DIR] [--folds 5] [--seeds 3] [--boot 1000]

Writes benchmarks/results/semantic_nih1000.json. Features are HOG + a 16x16 thumbnail, reduced by PCA fitted
on the training folds only (no CNN: a floor, to be replaced by fused CNN features). The findings cluster in few
patients (Edema: 31 images, 5 patients), so a single holdout leaves some findings with 0-2 test positives;
instead every image is scored once by a 5-fold patient-grouped cross-validation and AUROC is computed on the
pooled out-of-fold scores (caveat: pooling mixes five models). Every hyper-parameter is the estimator's
default; nothing is chosen on held-out data. Confidence intervals resample patients (percentile, 95%).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import numpy as np
from skimage.feature import hog
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from benchmarks._common import machine_info, write_result
from tlfusion.data.findings import CHESTXRAY14_FINDINGS, label_matrix, read_chestxray14
from tlfusion.data.images import load_batch
from tlfusion.evaluation.metrics import group_index
from tlfusion.evaluation.multilabel_metrics import multilabel_auroc
from tlfusion.semantic.label_embeddings import load_label_vectors
from tlfusion.semantic.metric_learning import (
    LOSSES,
    PROTOTYPE_PROJECTIONS,
    SemanticMetricClassifier,
    evaluate_gzsl,
    per_finding_auroc,
)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih1000"
UNSEEN = ("Edema", "Emphysema", "Fibrosis", "Pneumonia")  # fixed before looking at any result
PCA_COMPONENTS = 128


def image_features(images: np.ndarray) -> np.ndarray:
    """HOG (8x8 cells, 2x2 blocks, 9 orientations) concatenated with a 16x16 area-averaged thumbnail."""
    rows = []
    for image in images[..., 0] / 255.0:
        gradients = hog(image, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2))
        thumbnail = cv2.resize(image, (16, 16), interpolation=cv2.INTER_AREA).ravel()
        rows.append(np.concatenate([gradients, thumbnail]))
    return np.asarray(rows, dtype=np.float32)


def patient_bootstrap(
    statistic: Callable[[np.ndarray], float], patients: np.ndarray, n_boot: int, seed: int = 0
) -> list[float]:
    """95% percentile interval of ``statistic(row_indices)`` over resamples of patients with replacement."""
    _, patient_of_row = group_index(patients, len(patients), "patients")
    rows_of = [np.flatnonzero(patient_of_row == p) for p in range(patient_of_row.max() + 1)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(rows_of), len(rows_of))
        value = statistic(np.concatenate([rows_of[p] for p in drawn]))
        if value is not None and np.isfinite(value):
            values.append(value)
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def mean_auroc(Y: np.ndarray, scores: np.ndarray, names) -> float | None:
    return multilabel_auroc(Y, scores, names)["mean"]


def stratification_key(Y: np.ndarray) -> np.ndarray:
    """Per image: index of its rarest finding (-1 for none), so folds share out rare findings' patients."""
    rarity = np.argsort(np.argsort(Y.sum(axis=0)))
    return np.array([int(np.argmin(np.where(row > 0, rarity, 99))) if row.any() else -1 for row in Y])


def patient_folds(Y: np.ndarray, patients: np.ndarray, n_folds: int) -> np.ndarray:
    """Fold number of each image: StratifiedGroupKFold by patient, stratified by `stratification_key`."""
    fold_of_row = np.empty(len(Y), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=0)
    for fold, (_, test) in enumerate(splitter.split(Y, stratification_key(Y), patients)):
        fold_of_row[test] = fold
    return fold_of_row


def out_of_fold_scores(features, Y, fold_of_row, fit_score: Callable) -> np.ndarray:
    """Scores for every image from the fold model that did not see its patient (PCA refitted per fold)."""
    scores = None
    for fold in np.unique(fold_of_row):
        train, test = fold_of_row != fold, fold_of_row == fold
        reducer = make_pipeline(StandardScaler(), PCA(PCA_COMPONENTS, random_state=0)).fit(features[train])
        fold_scores = fit_score(reducer.transform(features[train]), Y[train], reducer.transform(features[test]))
        scores = np.zeros((len(Y), fold_scores.shape[1])) if scores is None else scores
        scores[test] = fold_scores
    return scores


def fold_mean_auroc(Y, scores, fold_of_row, names) -> dict[str, float | None]:
    """Per finding, AUROC averaged over the folds where it is defined (no pooling of different models)."""
    per_fold = [per_finding_auroc(Y[fold_of_row == f], scores[fold_of_row == f], names) for f in set(fold_of_row)]
    means = {}
    for name in names:
        defined = [auroc[name] for auroc in per_fold if auroc[name] is not None]
        means[name] = float(np.mean(defined)) if defined else None
    return means


def group_mean(values: dict[str, float | None], names) -> float:
    return float(np.mean([values[name] for name in names if values[name] is not None]))


def supervised_results(features, Y, patients, vectors, fold_of_row, seeds, n_boot) -> dict:
    """All 14 findings seen: a logistic-regression reference and SemanticMetricClassifier with each loss."""
    names = list(CHESTXRAY14_FINDINGS)

    def logistic(X_train, Y_train, X_test):
        model = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=2000)))
        return model.fit(X_train, Y_train).decision_function(X_test)

    def semantic(loss, seed):
        def fit_score(X_train, Y_train, X_test):
            model = SemanticMetricClassifier(loss=loss, random_state=seed).fit(X_train, Y_train, vectors)
            return model.decision_function(X_test, vectors)

        return fit_score

    scores = {"logistic_regression": out_of_fold_scores(features, Y, fold_of_row, logistic)}
    seed_means = {}
    for loss in LOSSES:
        per_seed = [out_of_fold_scores(features, Y, fold_of_row, semantic(loss, seed)) for seed in seeds]
        scores[loss] = per_seed[0]
        seed_means[loss] = {str(seed): mean_auroc(Y, s, names) for seed, s in zip(seeds, per_seed, strict=True)}
    results = {}
    for model, model_scores in scores.items():
        auroc = multilabel_auroc(Y, model_scores, names)
        row = {
            "mean_auroc": auroc["mean"],
            "ci95": patient_bootstrap(
                lambda rows, s=model_scores: mean_auroc(Y[rows], s[rows], names), patients, n_boot
            ),
            "per_finding": {name: auroc[name] for name in names},
            "fold_mean_auroc": group_mean(fold_mean_auroc(Y, model_scores, fold_of_row, names), names),
        }
        if model in LOSSES:
            row["mean_auroc_by_seed"] = seed_means[model]
        if model != "bce":
            row["delta_vs_bce_ci95"] = patient_bootstrap(
                lambda rows, s=model_scores: (
                    mean_auroc(Y[rows], s[rows], names) - mean_auroc(Y[rows], scores["bce"][rows], names)
                ),
                patients,
                n_boot,
            )
        results[model] = row
    return results


def gzsl_results(features, Y, patients, vectors, fold_of_row, n_boot) -> dict:
    """Train on the 10 seen findings, score all 14; control: unseen findings scored with each other's vectors."""
    names = list(CHESTXRAY14_FINDINGS)
    seen = [name for name in names if name not in UNSEEN]
    seen_columns = [names.index(name) for name in seen]
    rotated = dict(vectors)
    for name, other in zip(UNSEEN, UNSEEN[1:] + UNSEEN[:1], strict=True):
        rotated[name] = vectors[other]
    results = {}
    for loss in LOSSES:
        for projection in PROTOTYPE_PROJECTIONS:

            def fit_score(X_train, Y_train, X_test, loss=loss, projection=projection):
                model = SemanticMetricClassifier(loss=loss, prototype_projection=projection)
                model.fit(X_train, Y_train[:, seen_columns], vectors, seen=seen)
                return np.hstack([model.decision_function(X_test, vectors), model.decision_function(X_test, rotated)])

            both = out_of_fold_scores(features, Y, fold_of_row, fit_score)
            scores, control = both[:, : len(names)], both[:, len(names) :]
            result = evaluate_gzsl(Y, scores, names, seen, UNSEEN)
            for key in ("unseen", "h"):
                result[f"{key}_ci95"] = patient_bootstrap(
                    lambda rows, s=scores, k=key: evaluate_gzsl(Y[rows], s[rows], names, seen, UNSEEN)[k],
                    patients,
                    n_boot,
                )
            result["unseen_with_rotated_vectors"] = evaluate_gzsl(Y, control, names, seen, UNSEEN)["unseen"]
            result["per_finding"] = per_finding_auroc(Y, scores, names)
            fold_means = fold_mean_auroc(Y, scores, fold_of_row, names)
            result["fold_mean"] = {"seen": group_mean(fold_means, seen), "unseen": group_mean(fold_means, UNSEEN)}
            results[f"{loss}/{projection}"] = result
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with labels.csv")
    parser.add_argument("--folds", type=int, default=5, help="patient-grouped cross-validation folds")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds for the supervised comparison")
    parser.add_argument("--boot", type=int, default=1000, help="patient-bootstrap resamples")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    table = read_chestxray14(args.data_dir / "labels.csv")
    Y = label_matrix(table, CHESTXRAY14_FINDINGS)
    patients = table["patient"].to_numpy()
    features = image_features(load_batch(table["path"].tolist(), size=64))
    vectors = dict(
        zip(CHESTXRAY14_FINDINGS, load_label_vectors("chestxray14_minilm", CHESTXRAY14_FINDINGS), strict=True)
    )
    data = (features, Y, patients, vectors, patient_folds(Y, patients, args.folds))

    payload = {
        "data": str(args.data_dir),
        "features": f"HOG(8x8 cells, 2x2 blocks, 9 bins) + 16x16 thumbnail -> PCA({PCA_COMPONENTS}) per train fold",
        "label_vectors": "chestxray14_minilm (all-MiniLM-L6-v2, finding name + description)",
        "evaluation": (
            f"{args.folds}-fold StratifiedGroupKFold by Patient ID (seed 0, stratified by rarest finding); "
            "AUROC on the pooled out-of-fold scores of all images; fold_mean*: AUROC averaged over folds"
        ),
        "images": len(Y),
        "patients": int(len(np.unique(patients))),
        "positives": dict(zip(CHESTXRAY14_FINDINGS, Y.sum(axis=0).astype(int).tolist(), strict=True)),
        "estimator_defaults": SemanticMetricClassifier().get_params(),
        "bootstrap": {"resamples": args.boot, "unit": "patient", "interval": "percentile 95%"},
        "supervised": supervised_results(*data, seeds=list(range(args.seeds)), n_boot=args.boot),
        "gzsl": {"unseen": list(UNSEEN), "results": gzsl_results(*data, n_boot=args.boot)},
    }
    payload["seconds"] = round(time.perf_counter() - start, 1)
    payload["machine"] = machine_info("tensorflow-cpu", "keras", "scikit-learn", "scikit-image", "numpy")
    print(f"wrote {write_result('semantic_nih1000', payload)}")
    return payload


if __name__ == "__main__":
    main()
