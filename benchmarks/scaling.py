"""Extraction scaling: seconds and peak memory of `extract_features` vs the number of images (linear time, flat memory).

    python -m benchmarks.scaling [--quick] [--sizes 250 500 1000 2000] [--repeats 3]

Each (size, repeat) runs in a fresh subprocess: build MobileNetV2 (weights=None, 224 px: the cheapest backbone;
timing does not depend on the weights), warm up with `extract_features` on 32 images into a throwaway cache (this
does the one-time ONNX conversion, reported as `warmup_s`), then time one `extract_features(engine="auto")` call
with a fresh cache folder over the first N images of a fixed seeded shuffle of FracAtlas and Kermany (2777 PNGs,
so every size has the same mix). The timed call includes hashing, decoding and cache writes. Peak RSS is the
child's own maximum (`wait4` rusage); `rss_before_extract_mib` its maximum before the timed call (Python,
TensorFlow, model, ONNX conversion). Reports medians over repeats, a least-squares line seconds = a + b * images
(R^2) and the peak-memory growth ratio largest vs smallest size.
Writes benchmarks/results/scaling.json and benchmarks/results/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS_DIR, load_average, machine_info, measure_command, median, write_result

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCES = (DATA / "fracatlas" / "images", DATA / "kermany_pneumonia" / "images")
SIZES, QUICK_SIZES = (250, 500, 1000, 2000), (64, 128, 256)
BACKBONE, IMAGE_SIZE, BATCH_SIZE = "mobilenetv2", 224, 32
PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "onnxruntime", "tf2onnx", "numpy")


def image_paths(count: int) -> list[str]:
    """The first ``count`` images of a seeded shuffle of FracAtlas' and Kermany's PNGs (nested across sizes)."""
    paths = [str(p) for source in SOURCES for p in sorted(source.rglob("*.png"))]
    if len(paths) < count:
        raise SystemExit(f"{len(paths)} images under {[str(s) for s in SOURCES]}, {count} needed")
    return [paths[i] for i in np.random.default_rng(0).permutation(len(paths))[:count]]


def max_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child(count: int, report: Path) -> None:
    """In a fresh process: build the backbone, time one cold extraction, write the numbers to ``report``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tlfusion.backbones.registry import build_backbone
    from tlfusion.features.extraction import extract_features

    paths = image_paths(count)
    model = build_backbone(BACKBONE, IMAGE_SIZE, weights=None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as warm_cache:
        extract_features(
            model, paths[:BATCH_SIZE], IMAGE_SIZE, batch_size=BATCH_SIZE, cache_dir=warm_cache, progress=False
        )
    warmup = time.perf_counter() - started
    before = max_rss_mib()
    with tempfile.TemporaryDirectory() as cache_dir:
        started = time.perf_counter()
        features = extract_features(
            model, paths, IMAGE_SIZE, batch_size=BATCH_SIZE, cache_dir=cache_dir, progress=False
        )
        seconds = time.perf_counter() - started
    result = {"seconds": seconds, "warmup_s": warmup, "rss_before_extract_mib": before, "shape": list(features.shape)}
    report.write_text(json.dumps(result))


def measure(count: int) -> dict:
    """One fresh subprocess for ``count`` images: its report plus wall time and peak RSS."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [sys.executable, "-m", "benchmarks.scaling", "--child", str(count), "--report", str(report)]
        process = measure_command(command, cwd=Path(__file__).resolve().parents[1])
        if process["returncode"] != 0:
            raise SystemExit(f"child for {count} images failed with exit code {process['returncode']}")
        return {**json.loads(report.read_text()), **process}


def linear_fit(sizes: list[int], seconds: list[float]) -> dict:
    """Least-squares seconds = intercept + slope * images, and R^2."""
    x, y = np.asarray(sizes, float), np.asarray(seconds, float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    r2 = 1 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
    return {"slope_s_per_image": round(slope, 5), "intercept_s": round(intercept, 2), "r2": round(r2, 4)}


def summarise_size(count: int, runs: list[dict]) -> dict:
    seconds = median([run["seconds"] for run in runs])
    return {
        "images": count,
        "seconds": seconds,
        "images_per_s": round(count / seconds, 2),
        "peak_rss_mib": median([run["peak_rss_mib"] for run in runs], 1),
        "rss_before_extract_mib": median([run["rss_before_extract_mib"] for run in runs], 1),
        "warmup_s": median([run["warmup_s"] for run in runs], 2),
        "process_wall_s": median([run["wall_s"] for run in runs], 2),
        "seconds_all": [round(run["seconds"], 2) for run in runs],
        "load_average": load_average(),
    }


def plot(rows: list[dict], fit: dict, path: Path) -> Path | None:
    """Seconds and peak RSS vs images, side by side (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sizes = [row["images"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.plot(sizes, [row["seconds"] for row in rows], "o", label="measured")
    left.plot(sizes, [fit["intercept_s"] + fit["slope_s_per_image"] * n for n in sizes], "-", label="linear fit")
    left.set(xlabel="images", ylabel="seconds", title=f"extraction time (R² {fit['r2']:.3f})")
    left.legend()
    right.plot(sizes, [row["peak_rss_mib"] for row in rows], "o-", label="peak")
    right.plot(sizes, [row["rss_before_extract_mib"] for row in rows], "s--", label="before extraction")
    right.set(xlabel="images", ylabel="MiB", title="resident memory", ylim=(0, None))
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, one repeat")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"numbers of images (default {SIZES})")
    parser.add_argument("--repeats", type=int, help="fresh processes per size (default 3, quick 1)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.report)
    sizes = sorted(args.sizes or (QUICK_SIZES if args.quick else SIZES))
    repeats = args.repeats or (1 if args.quick else 3)
    machine = machine_info(*PACKAGES)
    rows = []
    for count in sizes:
        rows.append(summarise_size(count, [measure(count) for _ in range(repeats)]))
        print({key: value for key, value in rows[-1].items() if key != "seconds_all"}, flush=True)
    fit = linear_fit(sizes, [row["seconds"] for row in rows])
    machine["load_average_1min_after"] = load_average()[0]
    payload = {
        "benchmark": "scaling",
        "machine": machine,
        "settings": {
            "quick": args.quick,
            "sizes": sizes,
            "repeats": repeats,
            "backbone": BACKBONE,
            "weights": None,
            "image_size": IMAGE_SIZE,
            "batch_size": BATCH_SIZE,
            "engine": "auto",
            "data": [str(source) for source in SOURCES],
            "process": "fresh subprocess per size and repeat; untimed 32-image warm-up (ONNX conversion); fresh cache",
            "images": "first N of a seeded shuffle of FracAtlas + Kermany PNGs",
            "statistic": "median over repeats",
        },
        "sizes": rows,
        "fit": fit,
        "memory_growth_ratio": round(rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"], 3),
        "targets": {"fit_r2": {"min": 0.98}, "memory_growth_ratio": {"max": 1.25}},
    }
    figure = plot(rows, fit, RESULTS_DIR / "scaling.png")
    payload["plot"] = figure.name if figure else None
    print(json.dumps(fit), "memory growth", payload["memory_growth_ratio"])
    print("results:", write_result("scaling", payload))
    return payload


if __name__ == "__main__":
    main()
