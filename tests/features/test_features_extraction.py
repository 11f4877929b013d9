"""Feature extraction: the on-disk cache, ONNX Runtime vs Keras, multi-scale stages and flip averaging."""

import logging
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
from keras import layers
from sklearn.preprocessing import normalize

from tlfusion.backbones.registry import XrayInput, build_backbone, feature_model, stage_layer_names
from tlfusion.errors import InputError
from tlfusion.features import extraction as features
from tlfusion.features import onnx_graphs
from tlfusion.features import source as feature_source
from tlfusion.features.extraction import FeatureCache, extract_features
from tlfusion.features.runners import FeatureExtractor

SIZE = 24


def tiny_backbone(size: int = SIZE) -> keras.Model:
    """A flat model with tlfusion's landmarks, initialised from seed 0 (features spread about 0.014 on the test
    images, over 100x the 1e-4 tolerance; unseeded, the spread ranged 0.007-0.018 and the check of it was flaky)."""
    keras.utils.set_random_seed(0)
    image = keras.Input((size, size, 1), name="image")
    x = XrayInput("tf", name="xray_input")(image)
    x = layers.Conv2D(16, 3, strides=2, activation="relu", name="conv")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.DepthwiseConv2D(3, activation="swish", name="depthwise")(x)
    pooled = layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(image, layers.Dense(1, name="head")(pooled), name="tlfusion_tiny")


def write_png(path, seed: int) -> str:
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (30, 40), dtype=np.uint8))
    return str(path)


@pytest.fixture(autouse=True)
def fresh_runners(monkeypatch):
    """No converted/traced model carried over from another test."""
    monkeypatch.setattr(features, "EXTRACTOR", FeatureExtractor())


@pytest.fixture
def pngs(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    return [write_png(folder / f"{i}.png", seed=i) for i in range(5)]


@pytest.fixture
def sent_to_model(monkeypatch):
    """How many images each extraction actually ran through the model."""
    counts: list[int] = []
    compute = features.compute_in_process

    def counting(job, progress):
        counts.append(len(job.paths))
        return compute(job, progress)

    monkeypatch.setattr(features, "compute_in_process", counting)
    return counts


def test_second_call_reads_everything_from_the_cache(tmp_path, pngs, sent_to_model):
    model = tiny_backbone()
    first = extract_features(model, pngs, SIZE, cache_dir=tmp_path / "cache", engine="keras")
    second = extract_features(model, pngs, SIZE, cache_dir=tmp_path / "cache", engine="keras")
    assert first.shape == (5, 16) and first.dtype == np.float32
    assert sent_to_model == [5]
    np.testing.assert_array_equal(first, second)


def test_only_new_or_changed_images_are_extracted(tmp_path, pngs, sent_to_model):
    model = tiny_backbone()
    before = extract_features(model, pngs, SIZE, cache_dir=tmp_path / "cache", engine="keras")
    write_png(pngs[2], seed=99)
    extra = write_png(tmp_path / "images" / "extra.png", seed=7)
    after = extract_features(model, [*pngs, extra], SIZE, cache_dir=tmp_path / "cache", engine="keras")
    assert sent_to_model == [5, 2]
    np.testing.assert_array_equal(after[[0, 1, 3, 4]], before[[0, 1, 3, 4]])
    assert not np.allclose(after[2], before[2])


def test_identical_images_are_extracted_once(tmp_path, pngs, sent_to_model):
    copy = tmp_path / "images" / "copy.png"
    copy.write_bytes(Path(pngs[0]).read_bytes())
    result = extract_features(tiny_backbone(), [*pngs, str(copy)], SIZE, cache_dir=tmp_path / "cache", engine="keras")
    assert sent_to_model == [5]
    np.testing.assert_array_equal(result[0], result[5])


def test_preprocessing_is_part_of_the_cache_key(tmp_path, pngs, sent_to_model):
    model = tiny_backbone()
    plain = extract_features(model, pngs, SIZE, cache_dir=tmp_path / "cache", engine="keras")
    equalised = extract_features(model, pngs, SIZE, clahe=True, cache_dir=tmp_path / "cache", engine="keras")
    assert sent_to_model == [5, 5]
    assert not np.allclose(plain, equalised)
    folders = {FeatureCache.open(tmp_path / "c", "model", size, False).folder for size in (24, 32)}
    assert len(folders) == 2


def test_unreadable_cache_chunk_is_extracted_again(tmp_path, pngs, sent_to_model):
    model = tiny_backbone()
    extract_features(model, pngs, SIZE, cache_dir=tmp_path / "cache", engine="keras")
    for chunk in (tmp_path / "cache").rglob("chunk-*.npy"):
        chunk.write_bytes(b"truncated")
    extract_features(model, pngs, SIZE, cache_dir=tmp_path / "cache", engine="keras")
    assert sent_to_model == [5, 5]


def test_model_file_is_not_loaded_when_everything_is_cached(tmp_path, pngs, monkeypatch):
    model_file = tmp_path / "backbone.keras"
    build_backbone("mobilenetv2", 32, alpha=0.35).save(model_file)
    first = extract_features(model_file, pngs, 32, cache_dir=tmp_path / "cache", engine="keras")

    def refuse(*args, **kwargs):
        raise AssertionError("model loaded although every feature is cached")

    monkeypatch.setattr(feature_source, "load_model_file", refuse)
    np.testing.assert_array_equal(extract_features(model_file, pngs, 32, cache_dir=tmp_path / "cache"), first)


def test_onnx_runtime_matches_keras(tmp_path, pngs):
    model = tiny_backbone()
    by_keras = extract_features(model, pngs, SIZE, engine="keras")
    by_onnx = extract_features(model, pngs, SIZE, engine="onnx", cache_dir=tmp_path / "cache")
    assert by_keras.std() > 1e-2
    np.testing.assert_allclose(by_onnx, by_keras, atol=1e-4, rtol=0)
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1


def test_converted_graph_is_reused_from_the_cache_folder(tmp_path, pngs, monkeypatch):
    model = tiny_backbone()
    extract_features(model, pngs[:2], SIZE, engine="onnx", cache_dir=tmp_path / "cache")
    monkeypatch.setattr(features, "EXTRACTOR", FeatureExtractor())
    monkeypatch.setattr(onnx_graphs, "export_onnx", lambda model: pytest.fail("converted twice"))
    assert extract_features(model, pngs, SIZE, engine="onnx", cache_dir=tmp_path / "cache").shape == (5, 16)


def test_auto_engine_falls_back_to_keras_and_says_why(pngs, monkeypatch, caplog):
    def broken(model):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(onnx_graphs, "export_onnx", broken)
    model = tiny_backbone()
    with caplog.at_level(logging.WARNING, logger="tlfusion.features.extraction"):
        result = extract_features(model, pngs, SIZE, engine="auto")
    assert "converter exploded" in caplog.text
    np.testing.assert_array_equal(result, extract_features(model, pngs, SIZE, engine="keras"))


def branchy_backbone(size: int = 16) -> keras.Model:
    """Three resolution stages; the middle one ends at an Add whose branches must not be taken for its end."""
    image = keras.Input((size, size, 1), name="image")
    x = XrayInput("tf", name="xray_input")(image)
    stem = layers.Conv2D(4, 3, padding="same", activation="relu", name="stem")(x)
    padded = layers.ZeroPadding2D(1, name="pad")(stem)
    down = layers.Conv2D(6, 3, strides=2, activation="relu", name="down")(padded)
    left = layers.Conv2D(6, 3, padding="same", activation="relu", name="left")(down)
    right = layers.Conv2D(6, 1, activation="relu", name="right")(down)
    merged = layers.Add(name="merge")([left, right])
    deeper = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="deeper")(merged)
    pooled = layers.GlobalAveragePooling2D(name="features")(deeper)
    return keras.Model(image, layers.Dense(1, name="head")(pooled), name="tlfusion_branchy")


def test_stages_end_at_block_outputs_not_inside_branches_or_padding():
    model = branchy_backbone()
    assert stage_layer_names(model, 3) == ["stem", "merge", "deeper"]
    assert stage_layer_names(model, 1) == ["deeper"]
    with pytest.raises(InputError, match="has 3 resolution stages; asked for 4"):
        stage_layer_names(model, 4)


def test_stages_of_a_real_architecture():
    model = build_backbone("mobilenetv2", 32, alpha=0.35)
    assert stage_layer_names(model, 3) == ["block_6_expand_relu", "block_13_expand_relu", "out_relu"]


def test_multiscale_features_are_unit_norm_stage_blocks_ending_with_the_penultimate():
    model = branchy_backbone()
    images = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 1)).astype(np.float32)
    multiscale = np.asarray(feature_model(model, stages=2).predict_on_batch(images))
    penultimate = np.asarray(feature_model(model).predict_on_batch(images))
    assert multiscale.shape == (3, 6 + 8)
    np.testing.assert_allclose(np.linalg.norm(multiscale[:, :6], axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(multiscale[:, 6:], normalize(penultimate), rtol=1e-5, atol=1e-6)


def test_stages_have_their_own_cache_entry_and_onnx_graph(tmp_path, pngs, sent_to_model):
    model, cache = tiny_backbone(), tmp_path / "cache"
    single = extract_features(model, pngs, SIZE, cache_dir=cache, engine="onnx")
    by_onnx = extract_features(model, pngs, SIZE, cache_dir=cache, engine="onnx", stages=2)
    by_keras = extract_features(model, pngs, SIZE, engine="keras", stages=2)
    assert sent_to_model == [5, 5, 5] and single.shape == (5, 16) and by_onnx.shape == (5, 16 + 16)
    np.testing.assert_allclose(by_onnx, by_keras, atol=1e-4, rtol=0)
    assert len(list((cache / "onnx").glob("*.onnx"))) == 2
    extract_features(model, pngs, SIZE, cache_dir=cache, engine="onnx", stages=2)
    assert sent_to_model == [5, 5, 5]


def test_bad_requests_raise_input_error(tmp_path, pngs):
    model = tiny_backbone()
    with pytest.raises(InputError, match="image size 32 differs from the model's 24"):
        extract_features(model, pngs, 32, engine="keras")
    with pytest.raises(InputError, match="missing.png"):
        extract_features(model, [*pngs, str(tmp_path / "missing.png")], SIZE, cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match="engine"):
        extract_features(model, pngs, SIZE, engine="tensorrt")
    with pytest.raises(InputError, match="model file not found"):
        extract_features(tmp_path / "nope.keras", pngs, SIZE)
    with pytest.raises(InputError, match="stages must be a positive integer; got 0"):
        extract_features(model, pngs, SIZE, stages=0)


def test_flip_averages_each_image_with_its_mirror_in_its_own_cache_entry(tmp_path):
    images = [np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE), dtype=np.uint8) for seed in range(3)]
    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    mirrors = [str(tmp_path / f"mirror{i}.png") for i in range(3)]
    for image, path, mirror in zip(images, paths, mirrors, strict=True):
        cv2.imwrite(path, image)
        cv2.imwrite(mirror, image[:, ::-1])
    model, cache = tiny_backbone(), tmp_path / "cache"
    plain = extract_features(model, paths, SIZE, cache_dir=cache, engine="keras", progress=False)
    flipped = extract_features(model, paths, SIZE, cache_dir=cache, engine="keras", progress=False, flip=True)
    of_mirrors = extract_features(model, mirrors, SIZE, engine="keras", progress=False)
    np.testing.assert_allclose(flipped, (plain + of_mirrors) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(flipped, plain, atol=1e-3)
    np.testing.assert_array_equal(extract_features(model, paths, SIZE, cache_dir=cache, progress=False), plain)
