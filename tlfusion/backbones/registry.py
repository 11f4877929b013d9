"""Backbone registry: name -> keras.applications builder, its input normalisation, its feature and Grad-CAM layers.

Every model tlfusion builds is flat (no nested sub-model) and has the same three landmarks:

- input ``image``: grayscale, float32 in [0, 255], shape (size, size, 1);
- layer ``features``: the pooled penultimate features (what fusion concatenates);
- layer ``head``: logits (one unit for a binary task, otherwise one per class).

The last 4-D layer before ``features`` is the Grad-CAM layer. Flatness means Grad-CAM needs no nested-model tricks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import keras
from keras import layers

from tlfusion.backbones.imagenet import has_offline_weights, load_imagenet_weights
from tlfusion.errors import InputError

FEATURES_LAYER = "features"
HEAD_LAYER = "head"
INPUT_NAME = "image"
MODEL_PREFIX = "tlfusion_"


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one architecture: its keras.applications constructor and input normalisation."""

    builder: Any
    normalisation: Literal["torch", "caffe", "tf", "raw"]
    """The input scaling; "raw": the application normalises internally."""


REGISTRY: dict[str, BackboneSpec] = {
    "densenet121": BackboneSpec(keras.applications.DenseNet121, "torch"),
    "resnet50": BackboneSpec(keras.applications.ResNet50, "caffe"),
    "inceptionv3": BackboneSpec(keras.applications.InceptionV3, "tf"),
    "xception": BackboneSpec(keras.applications.Xception, "tf"),
    "efficientnetb0": BackboneSpec(keras.applications.EfficientNetB0, "raw"),
    "mobilenet": BackboneSpec(keras.applications.MobileNet, "tf"),
    "mobilenetv2": BackboneSpec(keras.applications.MobileNetV2, "tf"),
    "convnexttiny": BackboneSpec(keras.applications.ConvNeXtTiny, "raw"),
}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="tlfusion")
class XrayInput(layers.Layer):
    """Widen a [0, 255] grayscale image to three channels and apply an architecture's normalisation."""

    def __init__(self, normalisation: str = "raw", **kwargs):
        super().__init__(**kwargs)
        if normalisation not in ("torch", "caffe", "tf", "raw"):
            raise ValueError(f"unknown normalisation {normalisation!r}")
        self.normalisation = normalisation

    def call(self, images):
        rgb = keras.ops.concatenate([images, images, images], axis=-1)
        if self.normalisation == "torch":
            return (rgb / 255.0 - keras.ops.array(_IMAGENET_MEAN)) / keras.ops.array(_IMAGENET_STD)
        if self.normalisation == "caffe":
            return rgb - keras.ops.array(_CAFFE_MEAN_BGR)
        if self.normalisation == "tf":
            return rgb / 127.5 - 1.0
        return rgb

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)

    def get_config(self):
        return {**super().get_config(), "normalisation": self.normalisation}


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for `name`; an unknown name raises InputError listing the known ones."""
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        raise InputError(f"unknown backbone {name!r}; known: {sorted(REGISTRY)}") from None


def build_backbone(
    name: str,
    image_size: int = 224,
    weights: str | Path | None = None,
    num_outputs: int = 1,
    dropout: float = 0.2,
    **options: Any,
) -> keras.Model:
    """A flat classification model: image -> XrayInput -> architecture -> `features` -> dropout -> `head` logits.

    `weights` is None (random init), "imagenet" (offline from the shipped files for `mobilenet` and `mobilenetv2`,
    downloaded by Keras for the others), or a local `.keras` /
    `.weights.h5` file saved by tlfusion for the same architecture (any image size, any head: the head is rebuilt
    when its size differs). `options` go to the keras.applications constructor (e.g. `alpha=0.35`).
    """
    name = name.lower()
    spec = get_spec(name)
    image = keras.Input((image_size, image_size, 1), name=INPUT_NAME)
    widened = XrayInput(spec.normalisation, name="xray_input")(image)
    base = _application(spec, name, widened, weights, options)
    features = layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(base.output)
    dropped = layers.Dropout(dropout, name="head_dropout")(features)
    logits = layers.Dense(num_outputs, name=HEAD_LAYER)(dropped)
    model = keras.Model(image, logits, name=f"{MODEL_PREFIX}{name}")
    if str(weights) == "imagenet" and has_offline_weights(name):
        load_imagenet_weights(model, name)
    elif weights is not None and str(weights) != "imagenet":
        transfer_weights(load_model_file(weights, expected=name, **options), model)
    return model


def plain_backbone(entry, image_size: int, seed: int) -> keras.Model:
    """A backbone as an experiment configures it (`config.BackboneEntry`: weights loaded), not fine-tuned; a random
    start is drawn from `seed`, so a run without fine-tuning is reproducible."""
    keras.utils.set_random_seed(seed)
    return build_backbone(entry.name, image_size, entry.weights, **entry.options)


def _application(spec: BackboneSpec, name: str, tensor, weights, options: dict) -> keras.Model:
    download = str(weights) == "imagenet" and not has_offline_weights(name)
    try:
        return spec.builder(include_top=False, input_tensor=tensor, weights="imagenet" if download else None, **options)
    except TypeError as error:
        raise InputError(f"backbone {name}: bad option(s) {sorted(options)} ({error})") from None
    except Exception as error:
        if download:
            raise InputError(
                f"backbone {name}: could not load ImageNet weights ({type(error).__name__}); they are downloaded "
                "from the internet on first use: go online once, or pass a local weights file"
            ) from None
        raise


def load_model_file(path: str | Path, expected: str | None = None, **options: Any) -> keras.Model:
    """Load a tlfusion `.keras` model (safe mode) or `.weights.h5`, checking it is the `expected` architecture.

    A `.weights.h5` file holds no architecture: it is loaded into `expected` built with `options`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    if path.name.endswith(".weights.h5"):
        if expected is None:
            raise InputError(f"{path}: a .weights.h5 file needs the architecture name")
        model = build_backbone(expected, num_outputs=_head_units(path), **options)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Keras warns per layer before raising on a mismatch
                model.load_weights(path)
        except Exception as error:
            raise InputError(f"{path}: weights do not fit {expected} ({type(error).__name__})") from None
        return model
    if path.suffix != ".keras":
        raise InputError(f"{path}: weights must be a .keras or .weights.h5 file")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:
        raise InputError(f"{path}: not a loadable Keras model ({type(error).__name__}: {error})") from None
    architecture = architecture_of(model)
    if architecture is None:
        raise InputError(f"{path}: not a tlfusion backbone (model name {model.name!r})")
    if expected is not None and architecture != expected:
        raise InputError(f"{path}: holds a {architecture} model, not {expected}")
    return model


def _head_units(path: Path) -> int:
    """Number of head units stored in a `.weights.h5` file (so the model can be rebuilt to match)."""
    import h5py

    with h5py.File(path, "r") as store:
        kernel = store.get("layers/dense/vars/0")  # Keras 3 stores layers by type; the head is the only Dense
        if kernel is None:
            raise InputError(f"{path}: no '{HEAD_LAYER}' layer in this weights file")
        return int(kernel.shape[-1])


def architecture_of(model: keras.Model) -> str | None:
    """The registry name of a tlfusion model (from its name), or None for a foreign model."""
    if not model.name.startswith(MODEL_PREFIX):
        return None
    name = model.name.removeprefix(MODEL_PREFIX)
    return name if name in REGISTRY else None


def transfer_weights(source: keras.Model, target: keras.Model) -> None:
    """Copy weights layer by layer (by name); the head is copied only when its shape matches."""
    source_layers = {layer.name: layer for layer in source.layers}
    for layer in target.layers:
        donor = source_layers.get(layer.name)
        if donor is None or not layer.weights:
            continue
        shapes_match = [w.shape for w in donor.weights] == [w.shape for w in layer.weights]
        if not shapes_match and layer.name == HEAD_LAYER:
            continue
        if not shapes_match:
            raise InputError(f"weights for layer {layer.name!r} do not fit (different architecture options?)")
        layer.set_weights(donor.get_weights())


def feature_model(model: keras.Model, stages: int = 1) -> keras.Model:
    """The sub-graph image -> pooled penultimate features.

    With `stages` > 1, the output is multi-scale: the pooled outputs of the last `stages` resolution stages
    (`stage_layer_names`), each L2-normalised, concatenated shallowest first (the last block is `features`).
    """
    if stages == 1:
        return keras.Model(model.input, model.get_layer(FEATURES_LAYER).output, name=f"{model.name}_features")
    *earlier, _ = stage_layer_names(model, stages)
    pooled = [layers.GlobalAveragePooling2D()(model.get_layer(name).output) for name in earlier]
    blocks = [layers.UnitNormalization()(block) for block in [*pooled, model.get_layer(FEATURES_LAYER).output]]
    return keras.Model(model.input, layers.Concatenate()(blocks), name=f"{model.name}_features_{stages}_stages")


def stage_layer_names(model: keras.Model, stages: int) -> list[str]:
    """The layers that end the model's last `stages` resolution stages, shallowest first.

    A stage is a spatial size; it ends at its deepest layer that every path from the input to the Grad-CAM layer
    passes through (a block output, never a layer inside a branch or skipped by a shortcut). Padding layers do
    not start a stage. The last stage ends at the Grad-CAM layer.
    """
    if not isinstance(stages, int) or stages < 1:
        raise InputError(f"stages must be a positive integer; got {stages!r}")
    ends: dict[tuple[int, int], str] = {}
    for name in _dominators(model, gradcam_layer_name(model)):
        layer = model.get_layer(name)
        shape = layer.output.shape
        if len(shape) == 4 and not isinstance(layer, layers.ZeroPadding2D):
            ends[(shape[1], shape[2])] = name  # dict order: first time a size is met; value: its deepest layer
    if stages > len(ends):
        raise InputError(f"model {model.name!r} has {len(ends)} resolution stages; asked for {stages}")
    return list(ends.values())[-stages:]


def _dominators(model: keras.Model, target: str) -> list[str]:
    """Layers (in model order, `target` included) that every path from the input to `target` passes through."""
    dominators: dict[str, set[str]] = {}
    for layer in model.layers:  # a functional model lists its layers in topological order
        # Keras 3 has no public accessor for a layer's parents; flat tlfusion models call each layer once.
        parents = [node.operation.name for node in layer._inbound_nodes[0].parent_nodes]
        shared = set.intersection(*(dominators[parent] for parent in parents)) if parents else set()
        dominators[layer.name] = shared | {layer.name}
        if layer.name == target:
            return [layer.name for layer in model.layers if layer.name in dominators[target]]
    raise InputError(f"model {model.name!r} has no layer {target!r}")


def gradcam_layer_name(model: keras.Model) -> str:
    """Name of the last 4-D layer: the one feeding the `features` pooling."""
    pooled_input = model.get_layer(FEATURES_LAYER).input
    for layer in reversed(model.layers):
        if layer.output is pooled_input:
            return layer.name
    raise InputError(f"model {model.name!r} has no convolutional layer before '{FEATURES_LAYER}'")


def image_size_of(model: keras.Model) -> int:
    """The square input size a model was built for."""
    return int(model.input.shape[1])
