"""The out-of-distribution check (`tlfusion.bundle.ood`) on real images: does a chest model's calibration flag other
images?

    python -m benchmarks.ood_check [--per-set 80] [--size 128]

Calibrates on the features of a patient-grouped 70 % of the Kermany pneumonia images (the shipped ImageNet
MobileNetV1 + MobileNetV2 side by side, not fine-tuned, as `tlfusion demo` starts), then prints, for held-out Kermany
images, NIH ChestX-ray14 (adult chest) images and FracAtlas hand and leg radiographs, the share flagged (score above
1) and score percentiles. Reads ../shared/data; writes nothing.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from benchmarks._common import REPO

DATA = REPO.parent / "shared" / "data"


def image_sets(per_set: int) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The Kermany training rows (path, patient) and `per_set` image paths of each set scored."""
    kermany = pd.read_csv(DATA / "kermany_pneumonia" / "labels.csv")
    kermany["path"] = [str(DATA / "kermany_pneumonia" / p) for p in kermany["path"]]
    patients = np.sort(kermany["patient_key"].unique())
    training = np.random.default_rng(0).permutation(patients)[: int(0.7 * len(patients))]
    held_out = kermany[~kermany["patient_key"].isin(training)].sample(per_set, random_state=0)
    fracatlas = pd.read_csv(DATA / "fracatlas" / "dataset.csv")
    nih = pd.read_csv(DATA / "nih1000" / "labels.csv").sample(per_set, random_state=0)
    sets = {
        "kermany_held_out": held_out["path"].tolist(),
        "nih_adult_chest": [str(DATA / "nih1000" / p) for p in nih["path"]],
    }
    for region in ("hand", "leg"):
        rows = fracatlas[fracatlas["primary_region"] == region].sample(per_set, random_state=0)
        sets[f"fracatlas_{region}"] = [str(DATA / "fracatlas" / p) for p in rows["path"]]
    return kermany[kermany["patient_key"].isin(training)], sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-set", type=int, default=80)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    from tlfusion.backbones.registry import build_backbone, feature_model
    from tlfusion.bundle.ood import fit_feature_distance
    from tlfusion.data.images import decoded_batches
    from tlfusion.features.fusion import fuse

    models = [
        feature_model(build_backbone(name, args.size, weights="imagenet")) for name in ("mobilenet", "mobilenetv2")
    ]

    def features(paths: list[str]) -> np.ndarray:
        batches = decoded_batches(paths, args.size, batch_size=64)
        return np.concatenate([fuse([model.predict(batch, verbose=0) for model in models])[0] for batch in batches])

    training, sets = image_sets(args.per_set)
    distance = fit_feature_distance(features(training["path"].tolist()), training["patient_key"].to_numpy())
    print(
        json.dumps({"calibration_images": distance.images, "features": len(distance.center), "limit": distance.limit})
    )
    for name, paths in sets.items():
        scores = distance.score(features(paths))
        percentiles = dict(
            zip(("p5", "median", "p95"), np.percentile(scores, [5, 50, 95]).round(3).tolist(), strict=True)
        )
        print(json.dumps({"set": name, "images": len(scores), "flagged": int((scores > 1).sum()), **percentiles}))


if __name__ == "__main__":
    main()
