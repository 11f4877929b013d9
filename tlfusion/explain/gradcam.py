"""Grad-CAM and Grad-CAM++ for flat Keras models, batched and compiled once per model.

The target is explicit, as in pytorch-grad-cam: for a binary head (one logit) target 1 explains the positive class
(the logit) and target 0 the negative class (minus the logit); for a multi-class head the target is the class index.
A target may also be a class name, resolved against the class names given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from tlfusion.errors import InputError

METHODS = ("gradcam", "gradcam++")
MEAN_KEY = "mean"


def class_index(target: int | str, class_names: Sequence[str] | None = None) -> int:
    """The class index for `target` (an index, or a name found in `class_names`); unknown names raise InputError."""
    if isinstance(target, str):
        if class_names is None or target not in class_names:
            raise InputError(f"unknown class {target!r}; known: {list(class_names or [])}")
        return list(class_names).index(target)
    return int(target)


def default_layer_name(model: keras.Model) -> str:
    """The last layer with a 4-D output (for tlfusion models, `backbones.registry.gradcam_layer_name`)."""
    for layer in reversed(model.layers):
        if not isinstance(layer, keras.layers.InputLayer) and len(layer.output.shape) == 4:
            return layer.name
    raise InputError(f"model {model.name!r} has no 4-D (convolutional) layer for Grad-CAM")


def _target_weights(target: int, num_outputs: int) -> np.ndarray:
    """Weights w so that the explained score is logits @ w (binary: +1 / -1 on the single logit)."""
    num_classes = 2 if num_outputs == 1 else num_outputs
    if not 0 <= target < num_classes:
        raise InputError(f"target class {target} out of range for a model with {num_classes} classes")
    if num_outputs == 1:
        return np.array([1.0 if target == 1 else -1.0], np.float32)
    return np.eye(num_outputs, dtype=np.float32)[target]


def _channel_weights(activations: tf.Tensor, grads: tf.Tensor, method: str) -> tf.Tensor:
    """Per-channel importance: mean gradient (Grad-CAM) or the Grad-CAM++ alpha-weighted positive gradient."""
    if method == "gradcam":
        return tf.reduce_mean(grads, axis=(1, 2))
    grads_2 = tf.square(grads)
    grads_3 = grads_2 * grads
    activation_sums = tf.reduce_sum(activations, axis=(1, 2), keepdims=True)
    alpha = tf.math.divide_no_nan(grads_2, 2.0 * grads_2 + activation_sums * grads_3)
    return tf.reduce_sum(alpha * tf.nn.relu(grads), axis=(1, 2))


class GradCAM:
    """Class-activation maps of one flat model; the gradient model and its compiled step are built once.

    `layer_name` None picks the last 4-D layer. `method` is "gradcam" or "gradcam++". Calling the explainer on
    images [n, s, s, 1] returns maps [n, s, s] in [0, 1] (each divided by its maximum; an all-zero map stays zero).
    """

    def __init__(self, model: keras.Model, layer_name: str | None = None, method: str = "gradcam"):
        if method not in METHODS:
            raise InputError(f"unknown Grad-CAM method {method!r}; known: {list(METHODS)}")
        layer_name = layer_name or default_layer_name(model)
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            raise InputError(f"model {model.name!r} has no layer {layer_name!r}") from None
        if len(layer.output.shape) != 4:
            raise InputError(f"layer {layer_name!r} of {model.name!r} is not 4-D (shape {layer.output.shape})")
        self.model = model
        self.layer_name = layer_name
        self.method = method
        self.image_shape = tuple(model.input.shape[1:])
        self.num_outputs = int(model.output.shape[-1])
        self._grad_model = keras.Model(model.input, [layer.output, model.output])
        self._step = tf.function(
            self._maps,
            input_signature=[
                tf.TensorSpec((None, *self.image_shape), tf.float32),
                tf.TensorSpec((self.num_outputs,), tf.float32),
            ],
        )

    def _maps(self, images: tf.Tensor, target_weights: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            activations, logits = self._grad_model(images, training=False)
            scores = tf.linalg.matvec(logits, target_weights)
        grads = tape.gradient(scores, activations)  # images are independent at inference: per-image gradients
        weights = _channel_weights(activations, grads, self.method)
        cams = tf.nn.relu(tf.einsum("bhwc,bc->bhw", activations, weights))[..., None]
        cams = tf.image.resize(cams, self.image_shape[:2], method="bilinear")[..., 0]
        peaks = tf.reduce_max(cams, axis=(1, 2), keepdims=True)
        return tf.math.divide_no_nan(cams, peaks)

    def __call__(self, images: np.ndarray, target: int = 1, batch_size: int = 32) -> np.ndarray:
        """Maps [n, s, s] for `images` [n, s, s, 1], explaining class index `target`."""
        images = np.asarray(images, np.float32)
        if images.shape[1:] != self.image_shape:
            raise InputError(f"images of shape {images.shape[1:]} do not fit model input {self.image_shape}")
        weights = tf.constant(_target_weights(target, self.num_outputs))
        batches = [
            self._step(tf.constant(images[start : start + batch_size]), weights).numpy()
            for start in range(0, len(images), batch_size)
        ]
        return np.concatenate(batches) if batches else np.zeros((0, *self.image_shape[:2]), np.float32)


def bundle_gradcam(
    bundle,
    images: np.ndarray,
    target: int | str = 1,
    method: str = "gradcam",
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Grad-CAM of every backbone of a fitted bundle, plus their mean under key "mean".

    `target` is a class index or one of `bundle.class_names`. Pass all images in one call: each backbone's
    explainer is built (and compiled) once per call.
    """
    index = class_index(target, bundle.class_names)
    maps = {name: GradCAM(model, method=method)(images, index, batch_size) for name, model in _models(bundle).items()}
    maps[MEAN_KEY] = np.mean(list(maps.values()), axis=0)
    return maps


def _models(bundle) -> Mapping[str, keras.Model]:
    if not bundle.models:
        raise InputError("the bundle holds no backbone to explain")
    if MEAN_KEY in bundle.models:
        raise InputError(f"a backbone may not be named {MEAN_KEY!r} (reserved for the mean map)")
    return bundle.models
