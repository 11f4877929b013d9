"""Offline ImageNet weights: the shipped int8 TFLite MobileNets dequantised into Keras, checked against TFLite itself.

`tf.lite.Interpreter` (deprecated) serves only as the reference here; tlfusion parses the flatbuffer itself.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from tlfusion.backbones import imagenet
from tlfusion.backbones.registry import FEATURES_LAYER, build_backbone
from tlfusion.backbones.tflite import read_conv_weights
from tlfusion.cli import main
from tlfusion.errors import InputError

# the photo shipped beside the TFLite files, resized to 224 px
CAT = Path(__file__).resolve().parents[1] / "fixtures" / "cat.png"
EGYPTIAN_CAT = 286  # its class in the 1001-class label list (0 = background)


@pytest.fixture(scope="module")
def cat_rgb() -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(CAT)), cv2.COLOR_BGR2RGB)


def tflite_reference(architecture: str, rgb: np.ndarray, output_size: int) -> np.ndarray:
    """The dequantised values of the first tensor with `output_size` elements per image (pooled features or logits)."""
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(
            model_path=str(imagenet.OFFLINE_FILES[architecture].path), experimental_preserve_all_tensors=True
        )
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    pixels = rgb[None].astype(np.int16)
    if detail["dtype"] == np.int8:
        pixels -= 128
    interpreter.set_tensor(detail["index"], pixels.astype(detail["dtype"]))
    interpreter.invoke()
    for tensor in interpreter.get_tensor_details():
        if int(np.prod(tensor["shape"])) == output_size and tensor["dtype"] != np.int32:
            scale, zero_point = tensor["quantization"]
            return (interpreter.get_tensor(tensor["index"]).astype(np.float32).ravel() - zero_point) * scale
    raise AssertionError(f"no tensor of size {output_size}")


def keras_features(architecture: str, rgb: np.ndarray) -> np.ndarray:
    """Pooled features of the tlfusion model on an RGB photo (fed after its grayscale-widening input layer)."""
    model = build_backbone(architecture, 224, "imagenet")
    colour = keras.Model(model.get_layer("xray_input").output, model.get_layer(FEATURES_LAYER).output)
    return colour(rgb[None].astype(np.float32) / 127.5 - 1.0).numpy()[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize(("architecture", "width"), [("mobilenet", 1024), ("mobilenetv2", 1280)])
def test_converted_features_match_tflite(cat_rgb, architecture, width):
    features = keras_features(architecture, cat_rgb)
    assert cosine(features, tflite_reference(architecture, cat_rgb, width)) >= 0.99


def test_converted_mobilenetv2_gives_tflites_top1_class(cat_rgb):
    classifier = read_conv_weights(imagenet.OFFLINE_FILES["mobilenetv2"].path)[-1]  # the 1x1 conv after pooling
    logits = keras_features("mobilenetv2", cat_rgb) @ classifier.kernel[0, 0] + classifier.bias
    reference = tflite_reference("mobilenetv2", cat_rgb, 1001)
    assert int(np.argmax(logits)) == int(np.argmax(reference)) == EGYPTIAN_CAT


def test_random_init_differs_from_imagenet():
    converted = build_backbone("mobilenet", 64, "imagenet").get_layer("conv_pw_13").get_weights()[0]
    random = build_backbone("mobilenet", 64, None).get_layer("conv_pw_13").get_weights()[0]
    assert converted.shape == random.shape and not np.allclose(converted, random)


def test_corrupted_file_is_refused(tmp_path):
    corrupted = tmp_path / "v1.tflite"
    data = bytearray(imagenet.OFFLINE_FILES["mobilenet"].path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    with pytest.raises(InputError, match="corrupted or replaced"):
        imagenet.imagenet_convolutions("mobilenet", corrupted)


def test_a_file_that_is_not_tflite_is_refused(tmp_path):
    garbage = tmp_path / "x.tflite"
    garbage.write_bytes(b"\x10\x00\x00\x00TFL3" + bytes(range(256)) * 4)
    with pytest.raises(InputError, match="x.tflite"):
        read_conv_weights(garbage)


def test_other_options_are_refused_with_a_clear_line():
    with pytest.raises(InputError, match="alpha 1.0"):
        build_backbone("mobilenetv2", 64, "imagenet", alpha=0.35)


def test_cli_exits_2_naming_a_corrupted_shipped_file(tmp_path, folder_dataset, capsys, monkeypatch):
    from tests.test_cli import tiny_experiment

    shipped = imagenet.OFFLINE_FILES["mobilenet"]
    corrupted = tmp_path / shipped.path.name
    corrupted.write_bytes(b"truncated")
    monkeypatch.setitem(imagenet.OFFLINE_FILES, "mobilenet", shipped._replace(path=corrupted))
    experiment = tiny_experiment(tmp_path, folder_dataset, backbones=[{"name": "mobilenet", "weights": "imagenet"}])
    assert main(["extract", str(experiment), "--out", str(tmp_path / "run"), "--set", "finetune.enabled=false"]) == 2
    error = capsys.readouterr().err.strip()
    assert "mobilenet_v1" in error and len(error.splitlines()) == 1
