"""Explanations against independent references: Grad-CAM computed by hand on a tiny model, LIME in a second process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers
from sklearn.linear_model import LogisticRegression

from tests.conftest import write_png, xray_like
from tlfusion.backbones.registry import build_backbone, feature_model, gradcam_layer_name
from tlfusion.bundle.folder import load_bundle, save_bundle
from tlfusion.bundle.model import Bundle
from tlfusion.data.images import load_batch
from tlfusion.explain.cases import explain_cases
from tlfusion.explain.gradcam import GradCAM
from tlfusion.explain.lime import explain_lime
from tlfusion.features.fusion import FeatureFusion
from tlfusion.models.classifiers import fusion_pipeline

SIZE = 12


def tiny_model(num_outputs: int) -> keras.Model:
    """tlfusion's landmarks (input `image`, `features` pooling, `head`) around two convolutions; the last is 6x6."""
    keras.utils.set_random_seed(10 + num_outputs)  # weights under which every test map has both signs (asserted)
    image = keras.Input((SIZE, SIZE, 1), name="image")
    hidden = layers.Rescaling(1 / 255)(image)
    hidden = layers.Conv2D(6, 3, padding="same", activation="tanh", name="conv1")(hidden)
    hidden = layers.Conv2D(5, 3, strides=2, padding="same", activation="relu", name="conv2")(hidden)
    features = layers.GlobalAveragePooling2D(name="features")(hidden)
    return keras.Model(image, layers.Dense(num_outputs, name="head")(features), name="tiny")


def images(count: int = 3) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (count, SIZE, SIZE, 1)).astype(np.float32)


def reference_gradcam(model: keras.Model, layer: str, image: np.ndarray, score_weights: np.ndarray) -> np.ndarray:
    """Grad-CAM by the definition: channel weight = mean over space of d(score)/d(activation), ReLU of the weighted
    sum of activations, bilinear resize to the input size, divided by its maximum."""
    activations, grads = activations_and_gradients(model, layer, image, score_weights)
    raw = activations @ grads.mean(axis=(0, 1))
    cam = cv2.resize(np.maximum(raw, 0), (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    return cam / cam.max()


def activations_and_gradients(model, layer: str, image: np.ndarray, score_weights: np.ndarray):
    """One image's activations [h, w, c] at `layer` and the gradient of logits @ score_weights with respect to them."""
    probe = keras.Model(model.input, [model.get_layer(layer).output, model.output])
    with tf.GradientTape() as tape:
        activations, logits = probe(image[None])
        score = tf.reduce_sum(logits[0] * score_weights)
    return activations[0].numpy(), tape.gradient(score, activations)[0].numpy()


@pytest.mark.parametrize(
    ("num_outputs", "target", "score_weights"),
    [(1, 1, [1.0]), (1, 0, [-1.0]), (3, 2, [0.0, 0.0, 1.0])],
    ids=["binary-positive", "binary-negative", "three-class"],
)
@pytest.mark.parametrize("layer", ["conv2", "conv1"])
def test_gradcam_equals_the_hand_computed_map(num_outputs, target, score_weights, layer):
    model, batch = tiny_model(num_outputs), images()
    score_weights = np.array(score_weights, np.float32)
    expected = np.stack([reference_gradcam(model, layer, image, score_weights) for image in batch])
    maps = GradCAM(model, layer_name=layer)(batch, target=target)
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    raw = [
        a @ g.mean(axis=(0, 1)) for a, g in (activations_and_gradients(model, layer, i, score_weights) for i in batch)
    ]
    assert all((r > 0).any() and (r < 0).any() for r in raw)  # the ReLU and the sign of the target both matter


def test_default_layer_map_matches_the_closed_form():
    """Behind `features` (mean pooling) and a linear head, the mean gradient of the logit with respect to the last
    convolution's channel c is head_kernel[c] / (h * w), so Grad-CAM needs no gradient at all."""
    model, batch = tiny_model(1), images()
    assert gradcam_layer_name(model) == "conv2"
    activations = keras.Model(model.input, model.get_layer("conv2").output)(batch).numpy()
    kernel = model.get_layer("head").get_weights()[0][:, 0]
    raw = np.maximum(activations @ kernel / (activations.shape[1] * activations.shape[2]), 0)
    cams = np.stack([cv2.resize(cam, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) for cam in raw])
    expected = cams / cams.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(GradCAM(model)(batch), expected, atol=1e-5)


def explain_lime_to(bundle_dir: str, out: str, *paths: str) -> None:
    """Load a saved bundle, write LIME overlays for `paths` to `out` and the first image's LIME arrays to lime.npz."""
    bundle = load_bundle(bundle_dir)
    explain_cases(bundle, paths, None, out, methods=["lime"], lime_samples=40, seed=0)
    explanation = explain_lime(bundle, load_batch(paths[:1], bundle.image_size, False)[0], num_samples=40, seed=0)
    np.savez(
        Path(out) / "lime.npz", weights=explanation.weights, segments=explanation.segments, score=explanation.score
    )


def tiny_bundle(folder: Path) -> tuple[Path, list[str]]:
    """A saved one-backbone bundle (MobileNetV2 alpha 0.35 at 32 px, logistic regression) and two case images."""
    paths = [write_png(folder / f"case{i}.png", xray_like(i, 48, bright_blob=i % 2 == 1)) for i in range(8)]
    images = np.stack([cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (32, 32)) for p in paths])[..., None]
    keras.utils.set_random_seed(0)
    model = build_backbone("mobilenetv2", 32, alpha=0.35)
    X = feature_model(model).predict(images.astype(np.float32), verbose=0)
    fusion = FeatureFusion(block_sizes=[X.shape[1]]).fit(X)
    classifier = LogisticRegression(max_iter=500).fit(fusion.transform(X), np.arange(8) % 2)
    bundle = Bundle({"tiny": model}, fusion_pipeline(fusion, classifier), 0.5, ["normal", "abnormal"], 32)
    return save_bundle(bundle, folder / "bundle"), [str(path) for path in paths[:2]]


@pytest.mark.slow  # a second interpreter must import TensorFlow: about 20 s of CPU on top of the ~10 s test
def test_lime_is_identical_in_two_processes(tmp_path):
    """Same seed, here and in a fresh interpreter with another hash seed: the same LIME weights and the same PNGs."""
    bundle, paths = tiny_bundle(tmp_path)
    outs = [tmp_path / "here", tmp_path / "there"]
    child = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parents[2])!r}); from {__name__} import explain_lime_to; "
    )
    command = [sys.executable, "-c", child + "explain_lime_to(*sys.argv[1:])", str(bundle), str(outs[1]), *paths]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "TF_CPP_MIN_LOG_LEVEL": "3"}
    there = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    explain_lime_to(str(bundle), str(outs[0]), *paths)
    _, errors = there.communicate(timeout=300)  # reads stderr while waiting: a full pipe cannot block the child
    assert there.returncode == 0, errors
    first, second = (np.load(out / "lime.npz") for out in outs)
    assert first["weights"].shape == (32, 32) and np.abs(first["weights"]).max() > 0
    for key in ("weights", "segments", "score"):
        np.testing.assert_array_equal(first[key], second[key])
    pngs = sorted(path.name for path in outs[0].glob("*_lime.png"))
    assert len(pngs) == 2 and pngs == sorted(path.name for path in outs[1].glob("*_lime.png"))
    for name in pngs:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
