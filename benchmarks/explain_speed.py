"""Explanation speed: Grad-CAM seconds per image (DenseNet121, batched) and LIME seconds per image on a fusion.

    python -m benchmarks.explain_speed [--quick]

Writes benchmarks/results/explain_speed.json. Backbones have random weights (timing does not depend on them);
images are synthetic 224 px radiograph-like noise. Grad-CAM: median over repeats after one warm-up call (which
traces the compiled step). LIME: a real tlfusion Bundle of DenseNet121 + EfficientNetB0 (features
concatenated, standardised, logistic regression), run through ONNX Runtime as pipeline bundles are, and through Keras
for comparison; median seconds per image, and the part of it spent outside the fusion's predictions (segmentation,
masking, weighted ridge: LIME's own overhead).
Targets on 2 CPU cores: Grad-CAM <= 0.2 s/image, LIME (1000 samples) <= 60 s/image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression

from benchmarks._common import machine_info, write_result
from tlfusion.backbones.registry import build_backbone
from tlfusion.bundle.model import Bundle
from tlfusion.explain.gradcam import GradCAM
from tlfusion.explain.lime import explain_lime
from tlfusion.features.fusion import FeatureFusion, fuse
from tlfusion.features.onnx_graphs import onnx_graph
from tlfusion.features.runners import keras_runner
from tlfusion.models.classifiers import fusion_pipeline

IMAGE_SIZE = 224
BACKBONES = ["densenet121", "efficientnetb0"]
TARGETS = {"gradcam_s_per_image": 0.2, "lime_s_per_image": 60.0}


def fusion_bundle(names: list[str], fit_images: np.ndarray, fit_labels: np.ndarray, engine: str) -> Bundle:
    """A real tlfusion Bundle over random-weight backbones: standardised fused features -> logistic regression.

    With `engine` "onnx" it carries each backbone's checked ONNX graph, as the pipeline's bundles do.
    """
    models = {name: build_backbone(name, IMAGE_SIZE) for name in names}
    blocks = [keras_runner(model)[0](fit_images) for model in models.values()]
    X, block_sizes = fuse(blocks)
    fusion = FeatureFusion(block_sizes).fit(X)
    return Bundle(
        models=models,
        estimator=fusion_pipeline(fusion, LogisticRegression(max_iter=1000).fit(fusion.transform(X), fit_labels)),
        threshold=0.5,
        class_names=["negative", "positive"],
        image_size=IMAGE_SIZE,
        onnx_graphs={name: onnx_graph(model) for name, model in models.items()} if engine == "onnx" else {},
    )


class TimedPredictions:
    """Wraps a bundle's `predict_proba` and adds up its seconds, so LIME's own overhead can be told apart."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.seconds = 0.0

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        probabilities = self.bundle.predict_proba(images)
        self.seconds += time.perf_counter() - start
        return probabilities


def synthetic_images(count: int, seed: int = 0) -> np.ndarray:
    """Smooth noise with a bright elongated 'bone' per image: [count, 224, 224, 1] float32 in [0, 255]."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
    for image in images:
        centre = rng.uniform(60, 164)
        bone = np.exp(-(((columns - centre) / rng.uniform(10, 25)) ** 2)) * 150
        image[..., 0] = np.clip(40 + bone + rng.normal(0, 12, (IMAGE_SIZE, IMAGE_SIZE)), 0, 255)
    return images


def seconds(task) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    task()
    return time.perf_counter() - start


def bench_gradcam(images: np.ndarray, batch_size: int, repeats: int) -> dict:
    keras.utils.set_random_seed(0)
    explainer = GradCAM(build_backbone("densenet121", IMAGE_SIZE))
    warm_up = seconds(lambda: explainer(images[:batch_size], batch_size=batch_size))
    median = statistics.median(seconds(lambda: explainer(images, batch_size=batch_size)) for _ in range(repeats))
    return {
        "backbone": "densenet121",
        "layer": explainer.layer_name,
        "images": len(images),
        "batch_size": batch_size,
        "repeats": repeats,
        "warm_up_s": warm_up,
        "s_per_image": median / len(images),
    }


def bench_lime(images: np.ndarray, samples: int, batch_size: int, engine: str) -> dict:
    keras.utils.set_random_seed(0)
    bundle = fusion_bundle(BACKBONES, synthetic_images(16, seed=1), np.arange(16) % 2, engine)
    bundle.predict_proba(np.repeat(images[:1], batch_size, axis=0))  # warm-up: traces / allocates the full batch
    per_image, predicting = [], []
    for image in images:
        timed = TimedPredictions(bundle)
        per_image.append(
            seconds(lambda image=image, timed=timed: explain_lime(timed, image, samples, batch_size=batch_size))
        )
        predicting.append(timed.seconds)
    return {
        "engine": engine,
        "backbones": list(bundle.models),
        "classifier": "FeatureFusion (standardise) + LogisticRegression",
        "images": len(images),
        "num_samples": samples,
        "batch_size": batch_size,
        "s_per_image": statistics.median(per_image),
        "s_per_image_all": per_image,
        "fusion_predict_s_per_sample": statistics.median(predicting) / samples,
        "lime_overhead_s_per_image": statistics.median(np.subtract(per_image, predicting).tolist()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and LIME samples (not the target setting)")
    quick = parser.parse_args(argv).quick
    settings = {
        "image_size": IMAGE_SIZE,
        "gradcam_images": 16 if quick else 64,
        "gradcam_batch_size": 16,
        "gradcam_repeats": 2 if quick else 3,
        "lime_images": 1 if quick else 3,
        "lime_samples": 200 if quick else 1000,
        "lime_batch_size": 128,
        "lime_engines": ["onnx"] if quick else ["onnx", "keras"],
        "statistic": "median",
        "threads": "TensorFlow defaults (all cores)",
        "quick": quick,
    }
    machine = machine_info("tensorflow-cpu", "tensorflow", "keras", "lime", "scikit-image", "scikit-learn", "numpy")
    images = synthetic_images(settings["gradcam_images"])
    gradcam = bench_gradcam(images, settings["gradcam_batch_size"], settings["gradcam_repeats"])
    print(f"Grad-CAM densenet121: {gradcam['s_per_image']:.3f} s/image (target <= 0.2)")
    lime = {
        engine: bench_lime(
            images[: settings["lime_images"]], settings["lime_samples"], settings["lime_batch_size"], engine
        )
        for engine in settings["lime_engines"]
    }
    for engine, timing in lime.items():
        print(
            f"LIME {'+'.join(BACKBONES)} ({engine}), {timing['num_samples']} samples: {timing['s_per_image']:.1f} "
            f"s/image (target <= 60 at 1000 samples), LIME's own work {timing['lime_overhead_s_per_image']:.1f} s"
        )
    result = {
        "benchmark": "explain_speed",
        "machine": {**machine, "load_average_1min_after": os.getloadavg()[0]},
        "settings": settings,
        "targets": TARGETS,
        "gradcam": gradcam,
        "lime": lime["onnx"],
        "lime_by_engine": lime,
    }
    print(f"wrote {write_result('explain_speed', result)}")
    return result


if __name__ == "__main__":
    main()
