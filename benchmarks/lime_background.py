"""LIME and the radiograph's background: how much of LIME's outlines fell on the dark air and padding before the
background became one fixed segment, and how much does now.

    python -m benchmarks.lime_background [--run runs/benchmarks/accuracy/fracatlas_hand__imagenet] [--images 12]

Takes a finished run of the FracAtlas hand experiment (by default the accuracy benchmark's seed-0 run), picks
`--images` of its test images at random (seed 0) and explains each through the run's bundle twice, 200 LIME samples
and seed 0 each: with the background segment (`tlfusion.explain.lime.dark_background`, as shipped) and without it
(`BACKGROUND_LEVEL` < 0: nothing counts as background, the behaviour before). Recorded per image: the background's
share of the image and the share of the outlined pixels (top-5 supporting and opposing superpixels; and the
supporting ones alone) that lie in it. Writes benchmarks/results/lime_background.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import machine_info, write_result

REPO = Path(__file__).resolve().parents[1]
SAMPLES = 200
KINDS = ("outlined", "supporting")


def outlined_in_background(explanation, background: np.ndarray) -> dict[str, float]:
    """Share of the outlined pixels, and of the supporting ones, that lie in `background`."""
    outlined = explanation.positive_mask | explanation.negative_mask

    def share(mask: np.ndarray) -> float:
        return round(float((mask & background).sum() / max(mask.sum(), 1)), 3)

    return {"outlined": share(outlined), "supporting": share(explanation.positive_mask)}


def explain_both_ways(bundle, image: np.ndarray) -> dict:
    """The image's background share and `outlined_in_background` with the background segment and without it."""
    from tlfusion.explain import lime

    background = lime.dark_background(image)
    shipped = lime.BACKGROUND_LEVEL
    row = {"background_share": round(float(background.mean()), 3)}
    try:
        for name, level in (("before", -1.0), ("now", shipped)):
            lime.BACKGROUND_LEVEL = level
            row[name] = outlined_in_background(lime.explain_lime(bundle, image, SAMPLES, seed=0), background)
    finally:
        lime.BACKGROUND_LEVEL = shipped
    return row


def main(argv: list[str] | None = None) -> dict:
    from tlfusion.bundle.folder import load_bundle
    from tlfusion.data.images import load_batch
    from tlfusion.run.paths import RunPaths

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs/benchmarks/accuracy/fracatlas_hand__imagenet")
    parser.add_argument("--images", type=int, default=12)
    args = parser.parse_args(argv)
    machine = machine_info("tensorflow-cpu", "lime", "scikit-image")
    paths = RunPaths(args.run)
    bundle = load_bundle(paths.bundle)
    table = pd.read_csv(paths.table)
    chosen = table[table["split"] == "test"].sample(args.images, random_state=0)["path"].tolist()
    rows = {}
    for path, image in zip(chosen, load_batch(chosen, bundle.image_size, bundle.clahe), strict=True):
        rows[Path(path).name] = explain_both_ways(bundle, image)
        print(Path(path).name, rows[Path(path).name], flush=True)
    summary = {
        when: {kind: round(float(np.mean([row[when][kind] for row in rows.values()])), 3) for kind in KINDS}
        for when in ("before", "now")
    }
    summary["background_share"] = round(float(np.mean([row["background_share"] for row in rows.values()])), 3)
    payload = {
        "benchmark": "lime_background",
        "machine": machine,
        "settings": {"run": str(args.run), "images": args.images, "lime_samples": SAMPLES, "top_k": 5, "seed": 0},
        "mean": summary,
        "images": rows,
    }
    print("mean", summary)
    print("results:", write_result("lime_background", payload))
    return payload


if __name__ == "__main__":
    main()
