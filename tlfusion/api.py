"""The Python API behind `tlfusion.load_bundle` and `tlfusion.run_experiment` (TensorFlow loads on first use)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlfusion.errors import InputError

if TYPE_CHECKING:
    from tlfusion.bundle.model import Bundle

Image = str | Path | np.ndarray
BATCH = 32


class BundleModel:
    """A saved bundle as a scikit-learn-style image classifier.

    `images` is one image or a sequence of them; an image is a file path (decoded as `tlfusion predict` does) or
    a grayscale array H x W, uint8 or float in [0, 255]; a 3-D array is a stack of them (n x H x W). Arrays are
    letterboxed to the bundle's size (and equalised when it was trained with CLAHE) like files are. `trust` says
    how it was checked: "signed ..." (its signature verified with `TLFUSION_BUNDLE_KEY`) or "integrity only ...".
    """

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.classes_ = np.array(bundle.class_names)
        self.threshold = None if bundle.threshold is None else float(bundle.threshold)
        """Binary: the CV-chosen threshold on P(positive). K-class: None (the most probable class is predicted)."""
        self.trust = bundle.trust

    def predict_proba(self, images: Image | Sequence[Image]) -> np.ndarray:
        """Probabilities [n, K] in `classes_` order ((negative, positive) for a binary bundle)."""
        return np.concatenate([self.bundle.predict_proba(batch) for batch in self._batches(images)])

    def predict(self, images: Image | Sequence[Image]) -> np.ndarray:
        """Class names: binary, positive where its probability reaches the bundle's threshold (chosen on CV);
        K-class, the most probable class."""
        if self.threshold is None:
            return self.classes_[self.predict_proba(images).argmax(axis=1)]
        return np.where(self.predict_proba(images)[:, 1] >= self.threshold, self.classes_[1], self.classes_[0])

    def ood_score(self, images: Image | Sequence[Image]) -> np.ndarray:
        """Each image's out-of-distribution score: above 1, its features lie further from the training images' than
        99 % of those do (`tlfusion.bundle.ood`), so its prediction is unreliable. InputError for a bundle saved without
        the calibration."""
        if self.bundle.ood is None:
            raise InputError(
                "bundle: no out-of-distribution calibration (saved by an older tlfusion); re-run its experiment"
            )
        return np.concatenate([self.bundle.assess(batch)[1] for batch in self._batches(images)])

    def _batches(self, images: Image | Sequence[Image]) -> Iterator[np.ndarray]:
        items = _as_list(images)
        if not items:
            raise InputError("images: no images to predict")
        for start in range(0, len(items), BATCH):
            chunk = items[start : start + BATCH]
            yield np.stack([self._prepare(item, start + i) for i, item in enumerate(chunk)])

    def _prepare(self, item: Image, index: int) -> np.ndarray:
        from tlfusion.data.images import load_image, prepare_image

        size, clahe = self.bundle.image_size, self.bundle.clahe
        if isinstance(item, (str, Path)):
            return load_image(item, size, clahe)
        return prepare_image(_gray_array(item, index), size, clahe)


def _as_list(images: Image | Sequence[Image]) -> list[Image]:
    """One path or array -> [it]; a 3-D array or a sequence -> its items."""
    if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim != 3):
        return [images]
    return list(images)


def _gray_array(item: object, index: int) -> np.ndarray:
    """A float32 H x W image in [0, 255], or InputError naming `images[index]` and what is wrong."""
    array = np.asarray(item)
    if array.ndim != 2 or min(array.shape) < 1:
        raise InputError(f"images[{index}]: expected a grayscale H x W array or a file path; got shape {array.shape}")
    if array.dtype.kind not in "uif":
        raise InputError(f"images[{index}]: expected uint8 or float pixels; got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise InputError(f"images[{index}]: pixel values must be finite and in [0, 255]")
    return array


def load_bundle(path: str | Path) -> BundleModel:
    """Load a bundle folder (every file checked against its manifest) as a `BundleModel`."""
    from tlfusion.bundle.folder import load_bundle as load

    return BundleModel(load(path))


def run_experiment(
    path: str | Path,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    data_root: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Run an experiment YAML as `tlfusion run` does and return its run folder (default: runs/<name>).

    `overrides` are `key=value` strings as for `--set`; `data_root` is `--data-root`.
    """
    from tlfusion.config.experiment import load_experiment
    from tlfusion.pipeline import Pipeline

    experiment = load_experiment(path, list(overrides), data_root)
    run_dir = Path(out) if out is not None else Path("runs") / experiment.name
    Pipeline(experiment, run_dir, force=force).run()
    return run_dir
