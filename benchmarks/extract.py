"""Feature-extraction speed: tlfusion's pipeline vs the plain Keras loop a user would write, on the same PNG files.

    python -m benchmarks.extract [--quick]

Per backbone (random weights, 224 px), in one process and on the same files:

- tlfusion: `extract_features(engine="auto")` with a fresh cache folder per repeat (no cache hits; file hashing
  and cache writes are counted). The one-time ONNX conversion happens in an untimed warm-up and is reported apart.
- plain Keras: per batch of 32, `cv2.imread` + `cv2.resize` + `np.stack`, then `model.predict(batch)`.
- model only: `model.predict` (and the ONNX Runtime session) on images already in memory: the ceiling.

Timed runs alternate their order between repeats; medians over repeats. Writes benchmarks/results/extract.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import keras
import numpy as np

from benchmarks._common import machine_info, write_result
from tlfusion.backbones import build_backbone, feature_model
from tlfusion.data.images import load_batch
from tlfusion.features import ModelSource, cached_onnx_graph, extract_features, onnx_runner

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fracatlas" / "images"
BACKBONES = ("densenet121", "efficientnetb0")
IMAGE_SIZE = 224
BATCH_SIZE = 32
PACKAGES = ("tensorflow", "keras", "onnxruntime", "tf2onnx", "onnx", "numpy", "opencv-python-headless")


def pick_images(count: int) -> list[str]:
    """`count` PNGs spread evenly over the sorted FracAtlas file list."""
    paths = sorted(str(path) for path in DATA.rglob("*.png"))
    if len(paths) < count:
        raise SystemExit(f"{DATA}: {len(paths)} PNG files, {count} needed")
    return paths[:: len(paths) // count][:count]


def plain_keras(extractor: keras.Model, paths: list[str]) -> np.ndarray:
    """The loop a user would write: read, resize and stack a batch, then model.predict it."""
    outputs = []
    for start in range(0, len(paths), BATCH_SIZE):
        images = [cv2.imread(path, cv2.IMREAD_GRAYSCALE) for path in paths[start : start + BATCH_SIZE]]
        batch = np.stack([cv2.resize(image, (IMAGE_SIZE, IMAGE_SIZE)) for image in images]).astype(np.float32)
        outputs.append(extractor.predict(batch[..., None], verbose=0))
    return np.concatenate(outputs)


def tlfusion_pipeline(model: keras.Model, paths: list[str]) -> np.ndarray:
    with tempfile.TemporaryDirectory() as cache_dir:
        return extract_features(model, paths, IMAGE_SIZE, batch_size=BATCH_SIZE, cache_dir=cache_dir, progress=False)


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bench_backbone(name: str, paths: list[str], repeats: int) -> dict:
    keras.utils.set_random_seed(0)
    model = build_backbone(name, IMAGE_SIZE, weights=None)
    extractor = feature_model(model)
    with tempfile.TemporaryDirectory() as warm_cache:
        conversion_s = seconds(lambda: extract_features(model, paths[:BATCH_SIZE], IMAGE_SIZE, cache_dir=warm_cache))
        onnx_files = list(Path(warm_cache, "onnx").glob("*.onnx"))
        run_onnx = onnx_runner(cached_onnx_graph(ModelSource(model), Path(warm_cache)))[0] if onnx_files else None
    plain_keras(extractor, paths[:BATCH_SIZE])

    runs = {"tlfusion": lambda: tlfusion_pipeline(model, paths), "plain_keras": lambda: plain_keras(extractor, paths)}
    timings: dict[str, list[float]] = {key: [] for key in runs}
    for repeat in range(repeats):
        for key in sorted(runs, reverse=repeat % 2 == 1):
            timings[key].append(seconds(runs[key]))

    images = load_batch(paths, IMAGE_SIZE)
    keras_peak = [seconds(lambda: extractor.predict(images, batch_size=BATCH_SIZE, verbose=0)) for _ in range(repeats)]
    result = {
        "engine": "onnx" if run_onnx is not None else "keras",
        "warmup_with_onnx_conversion_s": round(conversion_s, 2),
        "seconds": {key: [round(value, 3) for value in values] for key, values in timings.items()},
        "model_only_keras_images_per_s": rate(len(paths), keras_peak),
    }
    for key, values in timings.items():
        result[f"{key}_images_per_s"] = rate(len(paths), values)
    result["ratio"] = round(result["tlfusion_images_per_s"] / result["plain_keras_images_per_s"], 3)
    result["pipeline_fraction_of_keras_peak"] = round(
        result["tlfusion_images_per_s"] / result["model_only_keras_images_per_s"], 3
    )
    if run_onnx is not None:

        def onnx_only():
            for start in range(0, len(images), BATCH_SIZE):
                run_onnx(images[start : start + BATCH_SIZE])

        result["model_only_onnx_images_per_s"] = rate(len(paths), [seconds(onnx_only) for _ in range(repeats)])
        result["pipeline_fraction_of_onnx_peak"] = round(
            result["tlfusion_images_per_s"] / result["model_only_onnx_images_per_s"], 3
        )
        sample = images[:BATCH_SIZE]
        difference = run_onnx(sample) - extractor.predict_on_batch(sample)
        result["onnx_vs_keras_max_abs_diff"] = float(np.abs(difference).max())
    result["load_average_1min_after"] = os.getloadavg()[0]
    keras.backend.clear_session()
    return result


def rate(count: int, durations: list[float]) -> float:
    return round(count / statistics.median(durations), 2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 images, 2 repeats (a few minutes on 2 cores)")
    parser.add_argument("--images", type=int, help="number of images (default 768, quick 256)")
    parser.add_argument("--repeats", type=int, help="timed repeats per pipeline (default 3, quick 2)")
    args = parser.parse_args(argv)
    count = args.images or (256 if args.quick else 768)
    repeats = args.repeats or (2 if args.quick else 3)
    paths = pick_images(count)

    machine = machine_info(*PACKAGES)
    backbones = {}
    for name in BACKBONES:
        backbones[name] = bench_backbone(name, paths, repeats)
        print(name, {key: value for key, value in backbones[name].items() if key != "seconds"}, flush=True)
    payload = {
        "benchmark": "extract",
        "machine": machine,
        "settings": {
            "quick": args.quick,
            "images": count,
            "repeats": repeats,
            "image_size": IMAGE_SIZE,
            "batch_size": BATCH_SIZE,
            "weights": None,
            "engine": "auto",
            "data": str(DATA),
            "statistic": "median over repeats",
        },
        "backbones": backbones,
        "ratio_vs_plain_keras": min(result["ratio"] for result in backbones.values()),
    }
    print("results:", write_result("extract", payload))
    return payload


if __name__ == "__main__":
    main()
