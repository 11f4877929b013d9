"""The out-of-distribution check: calibrated on training features, stored in the bundle, flagged by predict."""

from __future__ import annotations

import dataclasses
import json
import shutil

import cv2
import keras
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from tests.conftest import write_png, xray_like
from tlfusion.api import BundleModel
from tlfusion.backbones.registry import build_backbone, feature_model
from tlfusion.bundle.folder import load_bundle, save_bundle
from tlfusion.bundle.model import Bundle
from tlfusion.bundle.ood import fit_feature_distance
from tlfusion.commands import predict_images, prediction_summary
from tlfusion.data.images import file_sha256
from tlfusion.errors import InputError
from tlfusion.features.fusion import FeatureFusion
from tlfusion.models.classifiers import fusion_pipeline

SIZE = 64
TRAINING = 100


def checkerboard(index: int) -> np.ndarray:
    y, x = np.mgrid[:SIZE, :SIZE]
    cell = 2 + index % 3
    return ((x // cell + y // cell) % 2 * 255).astype(np.uint8)


def printed_digit(index: int) -> np.ndarray:
    image = np.full((SIZE, SIZE), 255, np.uint8)
    cv2.putText(image, str(index), (2, SIZE * 3 // 4), cv2.FONT_HERSHEY_SIMPLEX, SIZE / 40, 0, 2)
    return image


def test_calibration_flags_about_the_quantile_of_new_training_like_features_and_all_far_ones():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(8, 60))  # features on an 8-dimensional subspace, plus a little noise
    draw = lambda n: rng.normal(size=(n, 8)) @ mixing + 0.1 * rng.normal(size=(n, 60))  # noqa: E731
    distance = fit_feature_distance(draw(300), np.arange(300) // 2)  # two images per patient
    assert distance.quantile == 0.99 and distance.images == 300 and distance.components.shape == (20, 60)
    assert (distance.score(draw(2000)) > 1).mean() < 0.03
    off_subspace = draw(50) + 1.0 * rng.normal(size=(50, 60))
    assert (distance.score(off_subspace) > 1).all()
    assert (distance.score(3 * draw(50)) > 1).mean() > 0.9  # on the subspace, but far out along it


def test_too_few_images_or_one_patient_give_no_calibration():
    features = np.random.default_rng(0).normal(size=(30, 5))
    assert fit_feature_distance(features[:9], np.arange(9)) is None
    assert fit_feature_distance(features, np.zeros(30)) is None


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A bundle of one tiny real backbone trained on smooth 'radiographs', its calibration from their features, and
    PNG files: new images of that kind and of two very different kinds."""
    keras.utils.set_random_seed(0)
    model = build_backbone("mobilenetv2", SIZE, alpha=0.35)
    images = np.stack([xray_like(i, SIZE, bright_blob=i % 2 == 0) for i in range(TRAINING)])
    labels = np.arange(TRAINING) % 2 == 0
    X = feature_model(model).predict(images[..., None].astype(np.float32), verbose=0)
    fusion = FeatureFusion().fit(X)
    classifier = LogisticRegression(max_iter=500).fit(fusion.transform(X), labels.astype(int))
    bundle = Bundle(
        models={"tiny": model},
        estimator=fusion_pipeline(fusion, classifier),
        threshold=0.5,
        class_names=["normal", "abnormal"],
        image_size=SIZE,
        ood=fit_feature_distance(X, np.arange(TRAINING) // 2),
    )
    folder = tmp_path_factory.mktemp("ood")
    files = {
        "like_training": [xray_like(1000 + i, SIZE, bright_blob=i % 2 == 0) for i in range(20)],
        "checkerboard": [checkerboard(i) for i in range(6)],
        "digit": [printed_digit(i) for i in range(6)],
    }
    paths = {
        kind: [str(write_png(folder / kind / f"{i}.png", pixels)) for i, pixels in enumerate(images_)]
        for kind, images_ in files.items()
    }
    return save_bundle(bundle, folder / "bundle"), paths


@pytest.fixture(scope="module")
def loaded(synthetic):
    return load_bundle(synthetic[0])


def test_a_bundle_flags_images_unlike_its_training_images_and_not_training_like_ones(synthetic, loaded):
    (folder, paths), bundle = synthetic, loaded
    assert bundle.ood.images == TRAINING and (folder / "ood.npz").is_file()
    frame = predict_images(bundle, [p for kind in paths.values() for p in kind])
    assert list(frame.columns) == [
        "path",
        "prob_abnormal",
        "threshold",
        "predicted",
        "ood_score",
        "out_of_distribution",
    ]
    assert (frame["threshold"] == 0.5).all()
    flagged = dict(zip(frame["path"], frame["out_of_distribution"], strict=True))
    assert all(flagged[p] for p in paths["checkerboard"] + paths["digit"])
    assert sum(flagged[p] for p in paths["like_training"]) <= 2  # ~1 % expected; 20 images
    scores = BundleModel(bundle).ood_score(paths["digit"])  # the Python API: the same scores from file paths
    np.testing.assert_allclose(scores, frame.set_index("path").loc[paths["digit"], "ood_score"], rtol=1e-6)
    lines = prediction_summary(bundle, frame, "out.csv", None)
    assert lines[0].startswith(f"{len(frame)} images scored: ") and "threshold 0.5" in lines[0]
    assert "CSV written to out.csv" in lines[0]
    assert lines[1].startswith(f"warning: {int(frame['out_of_distribution'].sum())} of {len(frame)} images look unlike")


def test_a_bundle_without_calibration_predicts_without_the_columns_and_says_so(synthetic, loaded, tmp_path):
    paths, bundle = synthetic[1], loaded
    older = load_bundle(save_bundle(dataclasses.replace(bundle, ood=None), tmp_path / "older"))
    assert older.ood is None and not (tmp_path / "older" / "ood.npz").exists()
    frame = predict_images(older, paths["digit"])
    assert list(frame.columns) == ["path", "prob_abnormal", "threshold", "predicted"]
    np.testing.assert_allclose(frame["prob_abnormal"], predict_images(bundle, paths["digit"])["prob_abnormal"])
    note = prediction_summary(older, frame, None, None)[1]
    assert note.startswith("note: this bundle has no out-of-distribution calibration")
    with pytest.raises(InputError, match="no out-of-distribution calibration"):
        BundleModel(older).ood_score(paths["digit"])


def test_a_calibration_with_pickled_arrays_is_refused_even_with_a_matching_manifest(synthetic, tmp_path):
    folder = shutil.copytree(synthetic[0], tmp_path / "bundle")
    with open(folder / "ood.npz", "wb") as file:
        np.savez(file, center=np.array([{"not": "numbers"}], dtype=object))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["ood.npz"] = file_sha256(folder / "ood.npz")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"ood\.npz: not an out-of-distribution calibration"):
        load_bundle(folder)


def test_a_calibration_for_other_features_is_refused(loaded):
    bundle = loaded
    narrow = dataclasses.replace(bundle.ood, center=bundle.ood.center[:3])
    with pytest.raises(InputError, match="out-of-distribution calibration for 3 features"):
        dataclasses.replace(bundle, ood=narrow)
