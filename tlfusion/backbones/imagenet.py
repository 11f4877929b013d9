"""ImageNet weights without a network: MobileNet (V1 1.0) and MobileNetV2 1.0 from int8 TFLite files shipped in
`tlfusion/resources/imagenet/` (Apache-2.0, trained by the TensorFlow authors; provenance in its README).

In those files every BatchNorm is folded into the convolution before it and the convolutions come in the order of
the `keras.applications` layers, so each Conv2D / DepthwiseConv2D gets the dequantised kernel and the BatchNorm
after it becomes an identity that adds the folded bias. Reading a file takes well under a second, so nothing is
cached on disk; each file is checked against its sha256 before it is parsed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np

from tlfusion.backbones.tflite import ConvWeights, read_conv_weights
from tlfusion.errors import InputError

IMAGENET_DIR = Path(__file__).parents[1] / "resources" / "imagenet"


class ImagenetFile(NamedTuple):
    """One shipped TFLite file and the sha256 it must have."""

    path: Path
    sha256: str


OFFLINE_FILES: dict[str, ImagenetFile] = {
    "mobilenet": ImagenetFile(
        IMAGENET_DIR / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite",
        "f409ef4f73fcbb9667841965623c5c8524aac33d41b9bf5f3667161fb4a76319",
    ),
    "mobilenetv2": ImagenetFile(
        IMAGENET_DIR / "tf2_mobilenet_v2_1.0_224_ptq.tflite",
        "5d3137241276e79c86d14a74fe43581398ae0e815191d3dba45495b810840e8c",
    ),
}


def has_offline_weights(architecture: str) -> bool:
    """Whether `weights: imagenet` for this registry name is served from the shipped files."""
    return architecture in OFFLINE_FILES


def imagenet_convolutions(architecture: str, path: str | Path | None = None) -> list[ConvWeights]:
    """The dequantised convolutions of an architecture's ImageNet file (`path` overrides the shipped one)."""
    expected = OFFLINE_FILES[architecture]
    path = Path(path) if path is not None else expected.path
    if not path.is_file():
        raise InputError(f"{path}: ImageNet weights file for {architecture} not found (reinstall tlfusion)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected.sha256:
        shipped = expected.path.name
        raise InputError(f"{path}: sha256 {digest[:16]}... is not the shipped {shipped} (corrupted or replaced)")
    return read_conv_weights(path)


def load_imagenet_weights(model: keras.Model, architecture: str, path: str | Path | None = None) -> None:
    """Set every convolution of `model` (built without weights) and the BatchNorm after it from the ImageNet file."""
    convs = imagenet_convolutions(architecture, path)
    pairs = conv_batchnorm_pairs(model)
    if len(convs) < len(pairs):
        raise InputError(f"{architecture}: the ImageNet file has {len(convs)} convolutions, the model {len(pairs)}")
    for (conv, batchnorm), weights in zip(pairs, convs, strict=False):  # the file may end with a classifier conv
        kernel_shape = tuple(conv.kernel.shape)
        if kernel_shape != weights.kernel.shape:
            raise InputError(
                f"backbone {architecture}: layer {conv.name!r} has kernel {kernel_shape}, the ImageNet weights "
                f"{weights.kernel.shape}; they exist only for the default options (alpha 1.0)"
            )
        conv.set_weights([weights.kernel])
        batchnorm.set_weights(_identity_batchnorm(weights.bias, batchnorm.epsilon))


def conv_batchnorm_pairs(model: keras.Model) -> list[tuple[keras.layers.Layer, keras.layers.BatchNormalization]]:
    """Each convolution of `model` with the BatchNorm that follows it, in layer order."""
    pairs, pending = [], None
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D):
            if pending is not None or layer.use_bias:
                raise ValueError(f"{model.name}: convolution {layer.name!r} is not one bias-free conv + BatchNorm")
            pending = layer
        elif isinstance(layer, keras.layers.BatchNormalization) and pending is not None:
            pairs.append((pending, layer))
            pending = None
    return pairs


def _identity_batchnorm(bias: np.ndarray, epsilon: float) -> list[np.ndarray]:
    """[gamma, beta, moving_mean, moving_variance] that compute x + bias in inference mode."""
    ones = np.ones_like(bias)
    return [ones, bias, np.zeros_like(bias), ones - epsilon]
