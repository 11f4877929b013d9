"""Feature-extraction speed: the engine (ONNX Runtime vs Keras) and the pipeline (decoding, batching, caching)
measured apart, against the best plain-Keras loops a user would write, cold and warm, on the same PNG files.

    python -m benchmarks.extract [--quick] [--images N] [--repeats R] [--backbones NAME ...]

Per backbone (random weights, 224 px), in one process:

- ``engine``: images already decoded in memory, batches of 32: Keras ``predict_on_batch`` (the call tlfusion's
  Keras path makes), Keras ``predict`` and the ONNX Runtime session; ONNX conversion and session start timed
  apart. This isolates what the engine alone gives.
- ``decoding``: files to batches only: tlfusion's decoder (letterboxed, read ahead by one thread), a cv2
  read + resize loop, and a ``tf.data`` map with AUTOTUNE parallelism.
- ``pipeline``: files to features: the cv2 loop + ``predict_on_batch``, a ``tf.data`` pipeline + ``predict_on_batch``
  (prefetching), and ``extract_features`` with engine ``keras`` and ``auto`` (ONNX), each with a fresh feature
  cache (no hits; file hashing and cache writes counted). ``cold`` is the first pass in the process: the plain
  loops trace a fresh Keras function, ``extract_features`` starts from no runner and an empty cache folder, so
  ``auto`` pays the ONNX conversion that every first run pays. ``warm`` is the median of the next passes (runner
  kept in the process). ``tlfusion_cached_s``: a re-run whose features are all in the cache.

Ratios compare like with like: ``engine_onnx_over_keras`` (engine alone), ``pipeline_tlfusion_keras_over_plain``
(same Keras engine, so tlfusion's decoding/batching/caching against the plain loop), and tlfusion ``auto`` against
the faster plain loop, cold and warm. Writes benchmarks/results/extract.json (``--quick``: extract_quick.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import keras
import numpy as np
import tensorflow as tf

import tlfusion.features.extraction as features_module
from benchmarks._common import machine_info, write_result
from tlfusion.backbones.registry import build_backbone, feature_model
from tlfusion.data.images import decoded_batches, load_batch
from tlfusion.features.extraction import extract_features
from tlfusion.features.onnx_graphs import onnx_graph, onnx_runner
from tlfusion.features.runners import FeatureExtractor

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


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def rate(count: int, durations: list[float]) -> float:
    return round(count / statistics.median(durations), 2)


# ------------------------------------------------------------------------------------ plain loops
def cv2_batches(paths: list[str]) -> Iterator[np.ndarray]:
    """The loop a user would write: read, resize and stack a batch of grayscale PNGs."""
    for start in range(0, len(paths), BATCH_SIZE):
        images = [cv2.imread(path, cv2.IMREAD_GRAYSCALE) for path in paths[start : start + BATCH_SIZE]]
        yield np.stack([cv2.resize(image, (IMAGE_SIZE, IMAGE_SIZE)) for image in images]).astype(np.float32)[..., None]


def tf_data_batches(paths: list[str]) -> tf.data.Dataset:
    """A tf.data pipeline: parallel PNG decoding and resizing, batched and prefetched."""

    def decode(path: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_png(tf.io.read_file(path), channels=1)
        return tf.image.resize(tf.cast(image, tf.float32), (IMAGE_SIZE, IMAGE_SIZE))

    dataset = tf.data.Dataset.from_tensor_slices(paths).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(BATCH_SIZE).prefetch(tf.data.AUTOTUNE)


def run_all(run_batch: Callable[[np.ndarray], object], batches) -> None:
    for batch in batches:
        np.asarray(run_batch(batch))


# -------------------------------------------------------------------------------------- sections
def engine_section(model: keras.Model, paths: list[str], repeats: int) -> dict:
    """The engines on decoded images: Keras predict_on_batch / predict and ONNX Runtime, conversion apart."""
    images = load_batch(paths, IMAGE_SIZE)
    batches = [images[start : start + BATCH_SIZE] for start in range(0, len(images), BATCH_SIZE)]
    extractor = feature_model(model)
    started = time.perf_counter()
    graph = onnx_graph(model)
    conversion_s = time.perf_counter() - started
    session_s = seconds(lambda: onnx_runner(graph))
    run_onnx = onnx_runner(graph)[0]
    runs = {
        "keras_predict_on_batch": lambda: run_all(extractor.predict_on_batch, batches),
        "keras_predict": lambda: extractor.predict(images, batch_size=BATCH_SIZE, verbose=0),
        "onnx": lambda: run_all(run_onnx, batches),
    }
    for run in runs.values():
        run()  # warm-up: tracing, session first run
    timings = {name: [seconds(run) for _ in range(repeats)] for name, run in runs.items()}
    result = {f"{name}_images_per_s": rate(len(paths), values) for name, values in timings.items()}
    result["onnx_over_keras_predict_on_batch"] = round(
        result["onnx_images_per_s"] / result["keras_predict_on_batch_images_per_s"], 3
    )
    result["onnx_conversion_s"] = round(conversion_s, 2)
    result["onnx_session_start_s"] = round(session_s, 3)
    reference = np.asarray(extractor.predict_on_batch(batches[0]))
    difference = float(np.abs(run_onnx(batches[0]) - reference).max())
    result["onnx_vs_keras_max_abs_diff_relative"] = difference / max(float(np.abs(reference).max()), 1e-30)
    return result


def decoding_section(paths: list[str], repeats: int) -> dict:
    """Files to decoded batches only."""
    runs = {
        "tlfusion": lambda: list(decoded_batches(paths, IMAGE_SIZE, batch_size=BATCH_SIZE)),
        "cv2_loop": lambda: list(cv2_batches(paths)),
        "tf_data": lambda: list(tf_data_batches(paths)),
    }
    return {
        f"{name}_images_per_s": rate(len(paths), [seconds(run) for _ in range(repeats)]) for name, run in runs.items()
    }


def tlfusion_run(model: keras.Model, paths: list[str], engine: str) -> Callable[[], object]:
    """extract_features with a fresh, empty feature-cache folder (no cache hits)."""

    def run() -> None:
        with tempfile.TemporaryDirectory() as cache_dir:
            extract_features(
                model, paths, IMAGE_SIZE, batch_size=BATCH_SIZE, cache_dir=cache_dir, engine=engine, progress=False
            )

    return run


def pipeline_section(model: keras.Model, paths: list[str], repeats: int) -> dict:
    """Files to features, cold (first pass in the process) then warm (median of the next passes)."""
    features_module.EXTRACTOR = FeatureExtractor()  # no runner kept from an earlier backbone or section
    plain, tf_data = feature_model(model), feature_model(model)  # each traces its own function on first use
    runs = {
        "plain_keras_loop": lambda: run_all(plain.predict_on_batch, cv2_batches(paths)),
        "tf_data_loop": lambda: run_all(tf_data.predict_on_batch, tf_data_batches(paths)),
        "tlfusion_keras": tlfusion_run(model, paths, "keras"),
        "tlfusion_auto": tlfusion_run(model, paths, "auto"),
    }
    cold = {name: seconds(run) for name, run in runs.items()}
    warm: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name in sorted(runs, reverse=repeat % 2 == 1):  # alternate the order between repeats
            warm[name].append(seconds(runs[name]))
    result = {
        name: {
            "cold_s": round(cold[name], 2),
            "warm_s": [round(value, 3) for value in warm[name]],
            "cold_images_per_s": round(len(paths) / cold[name], 2),
            "warm_images_per_s": rate(len(paths), warm[name]),
        }
        for name in runs
    }
    with tempfile.TemporaryDirectory() as cache_dir:
        cached = lambda: extract_features(model, paths, IMAGE_SIZE, cache_dir=cache_dir, progress=False)  # noqa: E731
        cached()
        result["tlfusion_cached_s"] = round(seconds(cached), 3)
    return result


def ratios(pipeline: dict, engine: dict) -> dict:
    """Like-for-like ratios (above 1: tlfusion faster)."""
    best_plain = {
        phase: max(pipeline[name][f"{phase}_images_per_s"] for name in ("plain_keras_loop", "tf_data_loop"))
        for phase in ("cold", "warm")
    }
    out = {"engine_onnx_over_keras_predict_on_batch": engine["onnx_over_keras_predict_on_batch"]}
    for phase in ("cold", "warm"):
        tlfusion_keras = pipeline["tlfusion_keras"][f"{phase}_images_per_s"]
        out[f"pipeline_tlfusion_keras_over_plain_keras_loop_{phase}"] = round(
            tlfusion_keras / pipeline["plain_keras_loop"][f"{phase}_images_per_s"], 3
        )
        out[f"tlfusion_auto_over_best_plain_{phase}"] = round(
            pipeline["tlfusion_auto"][f"{phase}_images_per_s"] / best_plain[phase], 3
        )
    return out


def bench_backbone(name: str, paths: list[str], repeats: int) -> dict:
    keras.utils.set_random_seed(0)
    model = build_backbone(name, IMAGE_SIZE, weights=None)
    pipeline = pipeline_section(model, paths, repeats)  # first, so that its cold passes are the process's first
    print(name, "pipeline", {key: value for key, value in pipeline.items() if key != "warm_s"}, flush=True)
    engine = engine_section(model, paths, repeats)
    print(name, "engine", engine, flush=True)
    result = {
        "pipeline": pipeline,
        "engine": engine,
        "decoding": decoding_section(paths, repeats),
        "ratios": ratios(pipeline, engine),
        "load_average_1min_after": os.getloadavg()[0],
    }
    keras.backend.clear_session()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 images, 1 warm repeat, mobilenetv2 only")
    parser.add_argument("--images", type=int, help="number of images (default 768, quick 32)")
    parser.add_argument("--repeats", type=int, help="warm repeats per pipeline (default 3, quick 1)")
    parser.add_argument("--backbones", nargs="+", help=f"default {' '.join(BACKBONES)} (quick: mobilenetv2)")
    args = parser.parse_args(argv)
    count = args.images or (32 if args.quick else 768)
    repeats = args.repeats or (1 if args.quick else 3)
    backbones = args.backbones or (["mobilenetv2"] if args.quick else list(BACKBONES))
    paths = pick_images(count)
    machine = machine_info(*PACKAGES)
    results = {}
    for name in backbones:
        results[name] = bench_backbone(name, paths, repeats)
        print(name, results[name]["ratios"], flush=True)
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
            "data": str(DATA),
            "statistic": "cold: first pass in the process; warm: median over repeats",
        },
        "backbones": results,
    }
    print("results:", write_result("extract_quick" if args.quick else "extract", payload))
    return payload


if __name__ == "__main__":
    main()
