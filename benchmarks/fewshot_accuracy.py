"""Few-shot accuracy: 2-way 5-shot AUROC / accuracy (mean, 95% CI over patients) per data set, extractor and
few-shot classifier, with our in-domain backbones against the same architectures with random weights.

    python -m benchmarks.fewshot_accuracy [--quick]

Data sets (none of their evaluated images was seen by the in-domain backbones; checked against seen_images.txt):

- ``covid``: COVID-19 vs No finding, covid/actualmed + covid/figure1, grouped by ``patientid`` (never used in
  pretraining). 5 queries per class: the "No finding" class has only 21 patients.
- ``covid_actualmed``: the same task within Actualmed alone (21 COVID-19 vs 18 No finding patients), and
  ``covid_source``: the COVID-19 patients only, Actualmed vs Figure 1. "No finding" is 18 Actualmed and 3 Figure 1
  patients, so the set an image came from predicts its label in ``covid``; these two show how much of the
  ``covid`` score that cue can carry (diagnostics, not tuned on).
- ``kermany_test``: Kermany NORMAL vs PNEUMONIA, only the seed-0 patient-grouped test part that the pretraining
  dropped (``assign_splits(test_fraction=0.2, val_fraction=0.2, seed=0)``, grouped by ``patient_key``).
- ``fracatlas_hand``: FracAtlas hand, fractured vs not (held out of pretraining); no patient ids, so each image
  is its own group, except that identical files under two ids (21 sets in hand) form one group.

Extractors (pooled penultimate features via ``tlfusion.features.extraction.extract_features`` with a cache under
``.cache/fewshot_accuracy``): at 224 px, MobileNetV1 and MobileNetV2 with the offline ImageNet weights
(``imagenet/``, photographs only: they never saw a radiograph) and their fusion; the same two after ImageNet ->
musculoskeletal multi-task pretraining (``imagenet_msk/``: saved_models/*_imagenet_msk, pretrained at 160 px on knee,
paediatric hand and FracAtlas non-hand radiographs, no chest; used at 224 px) and their fusion; at 128 px, the
shipped in-domain MobileNetV2 and EfficientNetB0, their fusion (per-block L2, as the pipeline's few-shot stage
does), the same three with random weights ("scratch", seed 0), and
``chest/mobilenetv2``, pretrained on chest X-rays only (experiments/pretrain_chest.yaml: the Kermany and NIH
training parts; it saw the NIH base set but none of the evaluated images). Each is run with the penultimate
features alone (``stages=1``) and with multi-scale features (``stages=N``, N the screen's decision, now 3: the
pooled outputs of the last N resolution stages, each L2-normalised; the few-shot default, see below); the extractor
name carries the count.

Choices are made on development sets that this benchmark never reports: ``benchmarks.fewshot_screen`` screens the
number of pooled stages and feature transforms (power 0.5, centring on the supports / episode / NIH base mean,
transductive soft k-means) on Kermany's train and val parts and FracAtlas leg, and writes its decisions to
benchmarks/results/fewshot_screen.json, which this benchmark records under ``settings.screen``. (The earlier
hand-typed screen ran on ``kermany_test`` and ``fracatlas_hand``, which are reported here, and is gone.) The
ImageNet vs in-domain choice cannot be screened there: the in-domain backbones saw both sets in pretraining.
COVID is reported for every registered classifier, none selected on it. Intervals: ``ci95`` is over patients
(``tlfusion.fewshot.intervals``), ``episode_ci95`` over episodes only; ``counts`` gives the patients per class.
Writes benchmarks/results/fewshot_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from benchmarks._common import RESULTS_DIR, machine_info, write_result
from tlfusion.data.images import file_sha256
from tlfusion.data.sources import read_csv
from tlfusion.data.splits import assign_splits, content_groups
from tlfusion.fewshot.episodes import sample_episodes
from tlfusion.fewshot.evaluation import FEWSHOT_CLASSIFIERS, SUMMARY_KEYS, evaluate_episodes, make_fewshot_classifier
from tlfusion.fewshot.intervals import METHOD, episode_membership, interval_note
from tlfusion.training.provenance import SEEN_IMAGES, read_seen_images

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / ".cache" / "fewshot_accuracy"
IMAGE_SIZE = 128
IMAGENET_SIZE = 224
ARCHITECTURES = ("mobilenetv2", "efficientnetb0")
IMAGENET_ARCHITECTURES = ("mobilenet", "mobilenetv2")
SHIPPED = {arch: ROOT / "saved_models" / f"{arch}_xray128" / "model.keras" for arch in ARCHITECTURES}
# ImageNet -> musculoskeletal radiographs, multi-task (experiments/pretrain_msk.yaml; no chest, COVID or FracAtlas hand)
IMAGENET_MSK = {arch: ROOT / "saved_models" / f"{arch}_imagenet_msk" / "model.keras" for arch in IMAGENET_ARCHITECTURES}
# Pretrained on chest X-rays only (experiments/pretrain_chest.yaml: Kermany train/val + NIH), never on COVID.
CHEST = ROOT / "saved_models" / "mobilenetv2_chest128" / "model.keras"
WAYS, SHOTS, SEED = 2, 5, 0
QUERIES = {"covid": 5, "covid_actualmed": 5, "covid_source": 5, "kermany_test": 15, "fracatlas_hand": 15}
SCREEN = RESULTS_DIR / "fewshot_screen.json"  # written by benchmarks.fewshot_screen (development sets only)


def compared_stages(screen: Path = SCREEN) -> tuple[int, ...]:
    """Penultimate features alone (1) and the stage count benchmarks.fewshot_screen decided (2 before it ran)."""
    decided = json.loads(screen.read_text())["decisions"]["stages"] if screen.is_file() else 2
    return tuple(sorted({1, int(decided)}))


STAGES = compared_stages()
COVID_LABELS = {"COVID-19": "covid", "No finding": "normal"}
COVID_SOURCES = ("actualmed", "figure1")


# ---------------------------------------------------------------------------------------------- data sets


def covid_table(sources: tuple[str, ...] = COVID_SOURCES) -> pd.DataFrame:
    """COVID-19 vs No finding from the named sets (Actualmed, Figure 1), one patient per ``patientid``; the set each
    image came from is in ``source``."""
    parts = [
        read_csv(
            DATA / "covid" / name / "metadata.csv",
            label_column="finding",
            patient_column="patientid",
            label_map=COVID_LABELS,
        ).assign(source=name)
        for name in sources
    ]
    return pd.concat(parts, ignore_index=True)


def covid_actualmed_table() -> pd.DataFrame:
    """COVID-19 vs No finding within Actualmed alone: the source held constant, so it cannot be the cue."""
    return covid_table(("actualmed",))


def covid_source_table() -> pd.DataFrame:
    """COVID-19 images only, labelled by the set they came from: how well a cue other than the finding (the
    hospital, scanner and processing) separates the two sets that make up ``covid``."""
    covid = covid_table()
    return covid[covid["label"] == "covid"].assign(label=lambda table: table["source"]).reset_index(drop=True)


def kermany_test_table() -> pd.DataFrame:
    """The held-out test part of Kermany's seed-0 patient-grouped split (the part pretraining dropped)."""
    table = read_csv(DATA / "kermany_pneumonia" / "labels.csv", patient_column="patient_key")
    split = assign_splits(table, test_fraction=0.2, val_fraction=0.2, seed=0)
    return split[split["split"] == "test"].reset_index(drop=True)


def fracatlas_hand_table() -> pd.DataFrame:
    """FracAtlas hand, fractured ("1") vs not ("0"); every image its own group (no patient ids)."""
    return read_csv(
        DATA / "fracatlas" / "dataset.csv",
        label_column="fractured",
        region_column="primary_region",
        filters={"primary_region": "hand"},
    )


def base_table() -> pd.DataFrame:
    """NIH ChestX-ray14 thumbnails: a base set (for SimpleShot's base mean) that no evaluated set shares."""
    return read_csv(DATA / "nih1000" / "labels.csv", label_column="binary_label", patient_column="Patient ID")


DATASETS: dict[str, Callable[[], pd.DataFrame]] = {
    "covid": covid_table,
    "covid_actualmed": covid_actualmed_table,
    "covid_source": covid_source_table,
    "kermany_test": kermany_test_table,
    "fracatlas_hand": fracatlas_hand_table,
}


def seen_overlap(table: pd.DataFrame) -> dict[str, int]:
    """How many of the table's images each shipped backbone saw in pretraining (must all be 0)."""
    hashes = set(table["sha256"])
    shipped = {**SHIPPED, "chest/mobilenetv2": CHEST, **{f"imagenet_msk/{a}": p for a, p in IMAGENET_MSK.items()}}
    return {name: len(hashes & read_seen_images(path.parent / SEEN_IMAGES)) for name, path in shipped.items()}


# --------------------------------------------------------------------------------------------- extractors


def scratch_model(arch: str) -> Path:
    """The architecture with random weights (seed 0), saved once so its feature cache key is stable."""
    return saved_model(f"scratch_{arch}_{IMAGE_SIZE}", arch, IMAGE_SIZE, None)


def imagenet_model(arch: str) -> Path:
    """The architecture with the offline ImageNet weights, saved once so its feature cache key is stable."""
    return saved_model(f"imagenet_{arch}_{IMAGENET_SIZE}", arch, IMAGENET_SIZE, "imagenet")


def imagenet_msk_model(arch: str) -> Path:
    """The shipped ImageNet -> MSK backbone (pretrained at 160 px) moved into a 224-px model, saved once per file."""
    shipped = IMAGENET_MSK[arch]
    return saved_model(f"imagenet_msk_{arch}_{IMAGENET_SIZE}_{file_sha256(shipped)[:12]}", arch, IMAGENET_SIZE, shipped)


def saved_model(name: str, arch: str, size: int, weights: str | Path | None) -> Path:
    path = CACHE / f"{name}.keras"
    if not path.is_file():
        import keras

        from tlfusion.backbones.registry import build_backbone

        keras.utils.set_random_seed(SEED)
        path.parent.mkdir(parents=True, exist_ok=True)
        build_backbone(arch, size, weights=weights).save(path)
    return path


def features(model: Path, paths: list[str], stages: int, size: int = IMAGE_SIZE) -> np.ndarray:
    from tlfusion.features.extraction import extract_features

    return extract_features(model, paths, size, cache_dir=CACHE, progress=False, stages=stages)


def l2_rows(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def extractor_features(paths: list[str]) -> dict[str, np.ndarray]:
    """Feature matrix per extractor name ("in_domain/mobilenetv2 stages=1", ..., "scratch/fusion stages=3")."""
    out = {}
    starts = (
        ("imagenet", imagenet_model, IMAGENET_ARCHITECTURES, IMAGENET_SIZE),
        ("imagenet_msk", imagenet_msk_model, IMAGENET_ARCHITECTURES, IMAGENET_SIZE),
        ("in_domain", SHIPPED.__getitem__, ARCHITECTURES, IMAGE_SIZE),
        ("scratch", scratch_model, ARCHITECTURES, IMAGE_SIZE),
    )
    for stages in STAGES:
        for start, model_of, architectures, size in starts:
            blocks = {arch: features(model_of(arch), paths, stages, size) for arch in architectures}
            out.update({f"{start}/{arch} stages={stages}": block for arch, block in blocks.items()})
            out[f"{start}/fusion stages={stages}"] = np.hstack([l2_rows(block) for block in blocks.values()])
        out[f"chest/mobilenetv2 stages={stages}"] = features(CHEST, paths, stages)
    return out


# -------------------------------------------------------------------------------------------- classifiers


def classifier_variants(base_mean: np.ndarray | None) -> dict[str, BaseEstimator]:
    """Every registered few-shot classifier, plus SimpleShot centred on the NIH base-set mean."""
    variants = {name: make_fewshot_classifier(name) for name in FEWSHOT_CLASSIFIERS}
    if base_mean is not None:
        variants["simpleshot_nih_base"] = make_fewshot_classifier("simpleshot", base_mean=base_mean)
    return variants


def summary(scores: dict) -> dict:
    return {metric: {k: scores[metric][k] for k in SUMMARY_KEYS} for metric in ("auroc", "accuracy")}


def run_dataset(name: str, episodes: int, base_paths: list[str]) -> dict:
    table = DATASETS[name]()
    table["sha256"] = [file_sha256(path) for path in table["path"]]
    overlap = seen_overlap(table)
    if any(overlap.values()):
        raise SystemExit(f"{name}: {overlap} evaluated images were seen in pretraining")
    y, groups = table["label"].astype(str).to_numpy(), content_groups(table)  # identical images: one patient
    sampled = sample_episodes(y, groups, WAYS, SHOTS, QUERIES[name], episodes, seed=SEED)
    all_features = extractor_features(list(table["path"]))
    base = extractor_features(base_paths)
    results = {}
    for extractor, X in all_features.items():
        started = time.perf_counter()
        rows = {}
        for classifier, estimator in classifier_variants(base[extractor].mean(axis=0)).items():
            rows[classifier] = summary(evaluate_episodes(X, y, sampled, estimator, groups=groups))
        results[extractor] = rows
        best = max(rows, key=lambda c: rows[c]["auroc"]["mean"])
        print(
            f"{name:15s} {extractor:34s} ({time.perf_counter() - started:5.1f} s) "
            + " ".join(f"{c}={r['auroc']['mean']:.3f}" for c, r in rows.items())
            + f"  [max {best}]"
        )
    counts = {
        str(label): {"images": int((y == label).sum()), "patients": int(len(np.unique(groups[y == label])))}
        for label in np.unique(y)
    }
    return {
        "queries": QUERIES[name],
        "counts": counts,
        "interval": interval_note(episode_membership(sampled, groups)),
        "images_seen_in_pretraining": overlap,
        "results": results,
    }


def screen_record() -> dict:
    """The decisions of benchmarks.fewshot_screen (development sets only) and the commit they were made at; the
    screen's numbers stay in its own result file."""
    if not SCREEN.is_file():
        return {"status": f"not run: python -m benchmarks.fewshot_screen writes {SCREEN.name}"}
    screen = json.loads(SCREEN.read_text())
    return {
        "file": SCREEN.name,
        "development_sets": list(screen["settings"]["development_sets"]),
        "decisions": screen["decisions"],
        "commit": screen.get("machine", {}).get("git", {}).get("commit"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 episodes instead of 1000")
    quick = parser.parse_args(argv).quick
    episodes = 100 if quick else 1000
    started = time.perf_counter()
    base_paths = list(base_table()["path"])
    datasets = {name: run_dataset(name, episodes, base_paths) for name in DATASETS}
    result = {
        "benchmark": "fewshot_accuracy",
        "machine": machine_info("tensorflow", "keras", "numpy", "scikit-learn", "onnxruntime"),
        "settings": {
            "ways": WAYS,
            "shots": SHOTS,
            "queries": QUERIES,
            "episodes": episodes,
            "seed": SEED,
            "image_size": {"imagenet, imagenet_msk": IMAGENET_SIZE, "in_domain, scratch, chest": IMAGE_SIZE},
            "ci95": METHOD,
            "episode_ci95": "mean ± 1.96·std/√episodes (this pool's patients only)",
            "fusion": "per-backbone L2 then concatenation (stateless; as the pipeline's few-shot stage)",
            "scratch": "same architecture, random weights (keras seed 0)",
            "base_set": "nih1000 (all 1000 thumbnails) for simpleshot_nih_base",
            "stages": list(STAGES),
            "screen": screen_record(),
            "quick": quick,
        },
        "datasets": datasets,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(f"wrote {write_result('fewshot_accuracy_quick' if quick else 'fewshot_accuracy', result)}")
    return result


if __name__ == "__main__":
    main()
