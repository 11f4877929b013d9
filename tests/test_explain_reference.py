"""Explanations against independent references: Grad-CAM computed by hand on a tiny model."""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from tlfusion.backbones import gradcam_layer_name
from tlfusion.explain.gradcam import GradCAM

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
