"""Decoding radiographs (PNG/JPEG 8/16-bit, RGBA, palette, BMP, TIFF, DICOM: `dicom`) into model-ready grayscale arrays.

Every image leaves here as float32 in [0, 255] with one channel; the backbone's own input layer widens it to
three channels and applies the architecture's normalisation, so one decoded image serves every backbone.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from tlfusion.data.dicom import dicom_pixels, is_dicom
from tlfusion.data.image_header import FORMATS, check_size, declared_size
from tlfusion.errors import InputError

DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"} | DICOM_SUFFIXES
IMAGE_KINDS = "PNG, JPEG, BMP, TIFF or DICOM"
"""What `read_gray` decodes: PNG, JPEG, BMP and TIFF by their content, DICOM by its preamble or suffix."""
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str | None:
    """Why a file of this `st_mode` is not read ("a folder", "a FIFO", "a device", ...), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "a device")


def read_regular(path: str | Path) -> bytes:
    """The bytes of a regular file. A folder, FIFO, device, socket or dangling link raises InputError naming it,
    without reading it (the file is checked before opening, and opened non-blocking and checked again)."""
    try:
        why = _not_regular(os.stat(path).st_mode)
        if why is None:
            handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(handle, "rb") as file:
                why = _not_regular(os.fstat(handle).st_mode)
                if why is None:
                    return file.read()
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror})") from None
    raise InputError(f"{path}: not a regular file ({why}); not read")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (the image part of feature-cache keys)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """Scale any integer or float image to float32 [0, 255]; 8-bit stays as it is, deeper data is min-max scaled."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32)
    pixels = pixels.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros_like(pixels)
    return (pixels - low) * (255.0 / (high - low))


def _to_gray(pixels: np.ndarray) -> np.ndarray:
    """Collapse BGR / BGRA (alpha composited on black) to one channel."""
    if pixels.ndim == 2:
        return pixels
    if pixels.shape[2] == 4:
        alpha = pixels[:, :, 3:4].astype(np.float32) / np.iinfo(pixels.dtype).max
        pixels = (pixels[:, :, :3].astype(np.float32) * alpha).astype(pixels.dtype)
    if pixels.shape[2] == 1:
        return pixels[:, :, 0]
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)


def _decode(path: Path, data: bytes) -> np.ndarray:
    """The file's 2-D float32 image in [0, 255]: DICOM by its preamble (or its suffix), anything else by its content
    (PNG, JPEG, BMP or TIFF), whose declared size is checked before decoding."""
    if is_dicom(data) or path.suffix.lower() in DICOM_SUFFIXES:
        pixels, inverted = dicom_pixels(path, data)
        pixels = _to_unit_range(pixels)
        return 255.0 - pixels if inverted else pixels
    size = declared_size(data)
    if size is None:
        raise InputError(f"{path}: cannot decode image (not a {IMAGE_KINDS} file, or its header is cut short)")
    check_size(path, *size)
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.size == 0:
        raise InputError(f"{path}: cannot decode image (truncated or unsupported {FORMATS} file)")
    return _to_unit_range(_to_gray(pixels))


def read_gray(path: str | Path) -> np.ndarray:
    """Decode one image file to a 2-D float32 array in [0, 255]; an unreadable file raises InputError naming it."""
    path = Path(path)
    data = read_regular(path)
    if not data:
        raise InputError(f"{path}: empty file")
    try:
        return _decode(path, data)
    except InputError:
        raise
    except Exception as error:  # decoders raise many types; all mean "this file is not an image we can read"
        reason = " ".join(str(error).split())  # OpenCV's messages span lines
        raise InputError(f"{path}: cannot decode image ({type(error).__name__}: {reason})") from None


def apply_clahe(gray: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation on a [0, 255] image."""
    equaliser = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles))
    return equaliser.apply(np.clip(gray, 0, 255).astype(np.uint8)).astype(np.float32)


def resize_pad(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize so the longer side is `size` (aspect kept), then pad with black to a centred square."""
    height, width = gray.shape
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(gray, (new_w, new_h), interpolation=interpolation)
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def prepare_image(gray: np.ndarray, size: int, clahe: bool = False) -> np.ndarray:
    """Optionally equalise, and square one decoded 2-D image in [0, 255]: float32 [size, size, 1]."""
    if clahe:
        gray = apply_clahe(gray)
    return resize_pad(gray, size)[:, :, None]


def load_image(path: str | Path, size: int, clahe: bool = False) -> np.ndarray:
    """Decode, optionally equalise, and square one image: float32 [size, size, 1] in [0, 255]."""
    return prepare_image(read_gray(path), size, clahe)


def load_for_review(paths: Sequence[str | Path], size: int, clahe: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each image decoded once: the model inputs [n, size, size, 1] (`load_batch`'s) and the radiographs as shown
    beside their explanations (2-D, at their own size, equalised when `clahe`)."""
    shown = [apply_clahe(gray) if clahe else gray for gray in map(read_gray, paths)]
    inputs = [resize_pad(gray, size)[:, :, None] for gray in shown]
    return (np.stack(inputs) if inputs else np.zeros((0, size, size, 1), np.float32)), shown


def load_batch(paths: Sequence[str | Path], size: int, clahe: bool = False) -> np.ndarray:
    """Stack `load_image` over paths into [n, size, size, 1]."""
    return (
        np.stack([load_image(path, size, clahe) for path in paths])
        if paths
        else np.zeros((0, size, size, 1), np.float32)
    )


def decoded_batches(
    paths: Sequence[str | Path], size: int, clahe: bool = False, batch_size: int = 32, prefetch: int = 2
) -> Iterator[np.ndarray]:
    """`load_batch` over `paths` in batches [k, size, size, 1], decoded by one thread up to `prefetch` batches ahead.

    For inference: one decoding thread beside the model's own threads. On 2 CPU cores, parallel decoding made
    ONNX Runtime's threads wait on each other (DenseNet121 at 224 px: 18.7 images/s through `image_dataset`,
    29-30 this way; decoding alone runs at ~800 images/s).
    """
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlfusion-decode") as pool:
        pending: deque[Future] = deque()
        for chunk in chunks:
            pending.append(pool.submit(load_batch, chunk, size, clahe))
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def image_dataset(
    paths: Sequence[str],
    size: int,
    clahe: bool = False,
    batch_size: int = 32,
    labels: np.ndarray | None = None,
):
    """A `tf.data` pipeline that decodes in parallel, batches and prefetches (labels zipped in when given); for
    training, where Keras consumes a dataset.

    Files are expected to have been checked by `scan_images`; a decode error here is an internal error.
    """
    import tensorflow as tf

    def decode(path):
        return load_image(path.decode(), size, clahe)

    def load(path):
        image = tf.numpy_function(decode, [path], tf.float32, stateful=False)
        image.set_shape((size, size, 1))
        return image

    dataset = tf.data.Dataset.from_tensor_slices(list(map(str, paths))).map(
        load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    if labels is not None:
        dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.from_tensor_slices(labels)))
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def training_dataset(
    paths: Sequence[str],
    targets: np.ndarray,
    size: int,
    clahe: bool,
    batch_size: int,
    seed: int | None = None,
    augment: bool = False,
    views: int = 1,
):
    """(image, target) batches for Keras training, decoded images cached in memory; with `seed`, shuffled every
    epoch (repeatably) and, with `augment`, jittered per batch by `radiograph_augmentation`. With `views=2` each
    image appears twice in a row (batches of 2 x `batch_size` views, augmented strongly), for contrastive losses."""
    import tensorflow as tf

    data = image_dataset(list(map(str, paths)), size, clahe, batch_size, targets).unbatch()
    data = data.apply(tf.data.experimental.assert_cardinality(len(paths))).cache()  # known length: progress bars
    if seed is not None:
        data = data.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    if views > 1:
        data = data.flat_map(lambda x, y: tf.data.Dataset.from_tensors((x, y)).repeat(views))
        data = data.apply(tf.data.experimental.assert_cardinality(len(paths) * views))
    data = data.batch(batch_size * views)
    if seed is not None and augment:
        augmenter = radiograph_augmentation(seed, strong=views > 1)
        data = data.map(lambda x, y: (tf.clip_by_value(augmenter(x, training=True), 0.0, 255.0), y))
    return data.prefetch(tf.data.AUTOTUNE)


def radiograph_augmentation(seed: int = 0, strong: bool = False):
    """Mild geometric and photometric jitter suited to radiographs, on [0, 255] grayscale batches (a Keras model);
    `strong`: larger crops, rotations and contrast changes (two views of an image must differ for a label-free
    objective)."""
    import keras

    layers = keras.layers
    scale = 2.5 if strong else 1.0
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomRotation(0.03 * scale, fill_mode="constant", seed=seed + 1),  # about +-10 degrees (mild)
            layers.RandomZoom((-0.15 * scale, 0.05), fill_mode="constant", seed=seed + 2),  # mostly zoom in: crops
            layers.RandomBrightness(0.1 * scale, value_range=(0, 255), seed=seed + 3),
            layers.RandomContrast(0.15 * scale, value_range=(0, 255), seed=seed + 4),
        ],
        name="radiograph_augmentation",
    )


def scan_images(paths: Sequence[str], skip_bad: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Decode every image once: (sha256 per path, or "" for a skipped one; [(path, reason)] of bad files).

    Without `skip_bad` the first unreadable file raises InputError naming it.
    """
    hashes: list[str] = []
    bad: list[tuple[str, str]] = []
    for path in paths:
        try:
            read_gray(path)
            hashes.append(file_sha256(path))
        except InputError as error:
            if not skip_bad:
                raise
            bad.append((str(path), str(error)))
            hashes.append("")
    return hashes, bad
