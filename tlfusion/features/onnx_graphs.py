"""The backbones' feature sub-models as ONNX graphs: conversion with tf2onnx (checked against Keras), the on-disk
cache of converted graphs with their sha256, and ONNX Runtime sessions that run them on CPU."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from tlfusion.backbones.registry import INPUT_NAME, feature_model
from tlfusion.data.images import read_regular
from tlfusion.errors import InputError
from tlfusion.features.source import ModelSource
from tlfusion.fileio import write_bytes

logger = logging.getLogger(__name__)

ONNX_TOLERANCE = 1e-4
"""ONNX Runtime features must match Keras within this (absolute and relative) when the graph is converted."""
ONNX_CHUNK = 4
"""Images per ONNX Runtime call. On 2 CPU cores at 224 px, chunks of 4 ran EfficientNetB0 1.5x and DenseNet121
1.1x faster than chunks of 64 (activations stay in cache)."""

BatchRunner = Callable[[np.ndarray], np.ndarray]


def onnx_runner(graph: bytes) -> tuple[BatchRunner, int]:
    """A runner images [n, s, s, 1] -> features [n, d] through ONNX Runtime (`ONNX_CHUNK` images a call), and
    its input size."""
    session = _new_session(graph)
    model_input = session.get_inputs()[0]

    def run(batch: np.ndarray) -> np.ndarray:
        chunks = [batch[i : i + ONNX_CHUNK] for i in range(0, len(batch), ONNX_CHUNK)]
        return np.concatenate([session.run(None, {model_input.name: chunk})[0] for chunk in chunks])

    return run, int(model_input.shape[1])


def onnx_cache_path(cache_dir: Path, model_key: str) -> Path:
    """Where `extract_features` keeps the converted graph of the model with that key (its sha256 beside it, in
    `<model key>.onnx.sha256`)."""
    return cache_dir / "onnx" / f"{model_key}.onnx"


def cached_onnx_graph(source: ModelSource, cache_dir: Path | None = None) -> bytes:
    """The feature sub-model's ONNX graph, read from `cache_dir` or converted by `onnx_graph` (and written there)."""
    path = None if cache_dir is None else onnx_cache_path(cache_dir, source.key)
    graph = None if path is None else read_cached_onnx(path)
    if graph is not None:
        return graph
    graph = onnx_graph(source.model, source.stages)
    if path is not None:
        write_bytes(path, graph)
        write_bytes(_checksum_path(path), f"{hashlib.sha256(graph).hexdigest()}\n".encode())  # commits the graph
    return graph


def read_cached_onnx(path: Path) -> bytes | None:
    """The graph cached at `path`; None when there is none or it is damaged (not the bytes its checksum file
    records, or no checksum: written before the checksum or by a killed run), which is logged: a cache is rebuilt."""
    if not path.exists():
        return None
    try:
        graph, recorded = read_regular(path), read_regular(_checksum_path(path)).decode("ascii").strip()
    except (InputError, UnicodeError) as error:
        logger.warning("features: ignoring cached ONNX graph %s (%s); converting again", path, error)
        return None
    if hashlib.sha256(graph).hexdigest() != recorded:
        logger.warning("features: cached ONNX graph %s does not match its sha256; converting again", path)
        return None
    return graph


def _checksum_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def onnx_graph(model: keras.Model, stages: int = 1) -> bytes:
    """The feature sub-model as a serialised ONNX graph, checked against Keras on random images.

    A mismatch beyond `ONNX_TOLERANCE` raises RuntimeError.
    """
    extractor = feature_model(model, stages)
    graph = export_onnx(extractor)
    _check_onnx_matches_keras(_new_session(graph), extractor)
    return graph


def export_onnx(extractor: keras.Model) -> bytes:
    """A feature sub-model (`feature_model`) as a serialised ONNX graph (one input, batch size free) via tf2onnx."""
    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec((None, *extractor.input.shape[1:]), tf.float32, name=INPUT_NAME)
    function = tf.function(lambda images: extractor(images, training=False)).get_concrete_function(spec)
    # tf2onnx.convert.from_function turns captured constants (e.g. EfficientNet's Normalization mean) into extra
    # graph inputs; freezing the function first makes them constants.
    frozen = convert_variables_to_constants_v2(function)
    graph, _ = tf2onnx.convert.from_graph_def(
        frozen.graph.as_graph_def(),
        input_names=[tensor.name for tensor in frozen.inputs],
        output_names=[tensor.name for tensor in frozen.outputs],
        opset=17,
    )
    return graph.SerializeToString()


def _new_session(graph: bytes):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = _cpu_count()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.set_denormal_as_zero", "1")  # as TensorFlow does on CPU
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _check_onnx_matches_keras(session, extractor: keras.Model) -> None:
    images = np.random.default_rng(0).uniform(0, 255, (2, *extractor.input.shape[1:])).astype(np.float32)
    expected = np.asarray(extractor.predict_on_batch(images))
    actual = session.run(None, {session.get_inputs()[0].name: images})[0]
    if not np.allclose(actual, expected, rtol=ONNX_TOLERANCE, atol=ONNX_TOLERANCE):
        raise RuntimeError(f"ONNX features differ from Keras by up to {np.abs(actual - expected).max():.2g}")


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
