"""Grad-CAM of the selected model (`tlfusion.explain.decision`): closed forms through a real two-backbone bundle,
finite differences through every fusion option, the surrogate path and its disclosure on the review page."""

from __future__ import annotations

import html
import re

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
from keras import layers
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from tests.conftest import write_png, xray_like
from tlfusion.bundle.model import Bundle
from tlfusion.data.images import load_batch
from tlfusion.errors import InputError
from tlfusion.evaluation.results import pick_cases
from tlfusion.explain.cases import explain_cases
from tlfusion.explain.decision import (
    MIN_REFERENCE_ROWS,
    contribution_maps,
    decision_head,
    feature_gradient,
    linear_head,
    selected_model_maps,
)
from tlfusion.features.fusion import FeatureFusion
from tlfusion.models.classifiers import build_knn, build_lr, build_vote, build_xgb, fusion_pipeline

SIZE = 12


def tiny_backbone(name: str, channels: int, stride: int, seed: int) -> keras.Model:
    """tlfusion's landmarks (input `image`, `features` pooling, `head`) around two convolutions."""
    keras.utils.set_random_seed(seed)
    image = keras.Input((SIZE, SIZE, 1), name="image")
    hidden = layers.Rescaling(1 / 255)(image)
    hidden = layers.Conv2D(6, 3, padding="same", activation="tanh")(hidden)
    hidden = layers.Conv2D(channels, 3, strides=stride, padding="same", activation="relu", name="last_conv")(hidden)
    features = layers.GlobalAveragePooling2D(name="features")(hidden)
    return keras.Model(image, layers.Dense(1, name="head")(features), name=name)


@pytest.fixture(scope="module")
def backbones() -> dict[str, keras.Model]:
    """Two backbones whose last convolutions differ in size (6x6 x 5, 4x4 x 4)."""
    return {"a": tiny_backbone("a", 5, 2, 1), "b": tiny_backbone("b", 4, 3, 2)}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """40 images [40, 12, 12, 1] and labels that depend on the images (so the classifiers learn something)."""
    images = np.random.default_rng(0).uniform(0, 255, (40, SIZE, SIZE, 1)).astype(np.float32)
    labels = (images[:, :6, :6].mean(axis=(1, 2, 3)) > images[:, 6:, 6:].mean(axis=(1, 2, 3))).astype(int)
    return images, labels


def fitted_bundle(backbones, data, classifier, flip: bool = False, **fusion) -> Bundle:
    """A real in-memory bundle: the backbones, a FeatureFusion and `classifier`, fitted on `data`."""
    width = sum(int(model.get_layer("features").output.shape[-1]) for model in backbones.values())
    placeholder = fusion_pipeline(FeatureFusion(), LogisticRegression()).fit(np.eye(2, width), [0, 1])
    unfitted = Bundle(backbones, placeholder, 0.5, ["normal", "abnormal"], SIZE, flip=flip)
    X = unfitted.features(data[0])
    widths = [int(model.get_layer("features").output.shape[-1]) for model in backbones.values()]
    estimator = fusion_pipeline(FeatureFusion(block_sizes=widths, **fusion), classifier).fit(X, data[1])
    return Bundle(backbones, estimator, 0.5, ["normal", "abnormal"], SIZE, flip=flip, meta={"model": "fusion/x"})


def last_conv(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return keras.Model(model.input, model.get_layer("last_conv").output)(images).numpy().astype(np.float64)


def test_lr_map_is_the_closed_form(backbones, data):
    """Fusion (z-score) then build_lr (StandardScaler, LogisticRegression): the decision score is
    X @ (w / s_lr / s_fusion) + c, so each backbone's Grad-CAM weights are that vector's block, the maps are
    ReLU(sum over backbones of resize(A @ weights)) / max, and each raw map's mean is the backbone's share of the
    score."""
    bundle = fitted_bundle(backbones, data, build_lr())
    scaler, lr = (step for _, step in bundle.classifier.steps)
    weights = lr.coef_[0] / scaler.scale_ / bundle.fusion.scaler_.scale_
    blocks = {"a": weights[:5], "b": weights[5:]}
    raw = {name: last_conv(model, data[0]) @ blocks[name] for name, model in backbones.items()}
    summed = sum(
        np.stack([cv2.resize(m, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) for m in raw[name]]) for name in raw
    )
    both_signs = np.flatnonzero((summed.max(axis=(1, 2)) > 0) & (summed.min(axis=(1, 2)) < 0))[:4]
    assert len(both_signs) == 4  # images on which the ReLU matters
    images, summed = data[0][both_signs], summed[both_signs]
    expected = np.maximum(summed, 0) / np.maximum(summed, 0).max(axis=(1, 2), keepdims=True)

    head = decision_head(bundle.estimator, None, bundle.threshold)
    assert head.exact and head.title("fusion/lr") == "Grad-CAM of the selected model fusion/lr (exact)"
    np.testing.assert_allclose(selected_model_maps(bundle, images, head), expected, atol=1e-5)

    X = bundle.features(images)
    scores = bundle.estimator.decision_function(X) - bundle.estimator.decision_function(np.zeros_like(X))
    np.testing.assert_allclose(X @ weights, scores, rtol=1e-5, atol=1e-6)
    gradient = feature_gradient(bundle.fusion, head.head, X)
    np.testing.assert_allclose(gradient, np.broadcast_to(weights, X.shape), rtol=1e-6)
    maps = contribution_maps(bundle, images, gradient)
    np.testing.assert_allclose(sum(m.mean(axis=(1, 2)) for m in maps.values()), scores, rtol=1e-4, atol=1e-6)


def test_flipped_bundle_maps_add_up_to_the_flip_averaged_score(backbones, data):
    """With flip, the features average the image's and its mirror's; the half-weighted maps of both views must add
    up to the score of those averaged features."""
    bundle = fitted_bundle(backbones, data, build_lr(), flip=True)
    images = data[0][:3]
    X = bundle.features(images)
    head = decision_head(bundle.estimator, None, bundle.threshold)
    maps = contribution_maps(bundle, images, feature_gradient(bundle.fusion, head.head, X))
    assert sorted(maps) == ["a", "a|flipped", "b", "b|flipped"]
    scores = bundle.estimator.decision_function(X) - bundle.estimator.decision_function(np.zeros_like(X))
    np.testing.assert_allclose(sum(m.mean(axis=(1, 2)) for m in maps.values()), scores, rtol=1e-4, atol=1e-6)
    shown = selected_model_maps(bundle, images, head)
    assert shown.shape == (3, SIZE, SIZE) and shown.min() >= 0
    assert set(np.round(shown.max(axis=(1, 2)), 6)) <= {0.0, 1.0}  # divided by its peak; all-negative stays 0


@pytest.mark.parametrize(
    "fusion", [{"l2": True}, {"pca": 4}, {"l2": True, "pca": 3}, {"standardize": False, "l2": True}], ids=str
)
def test_feature_gradient_matches_finite_differences(fusion):
    """Through block L2 normalisation (non-linear) and PCA the gradient is the decision function's own."""
    rng = np.random.default_rng(1)
    X, y = rng.normal(1.0, 1.0, (60, 9)), rng.integers(0, 2, 60)
    estimator = fusion_pipeline(FeatureFusion(block_sizes=[5, 4], **fusion), build_lr()).fit(X, y)
    head = linear_head(estimator.named_steps["clf"])
    rows = X[:3]
    gradient = feature_gradient(estimator.named_steps["fusion"], head, rows)
    step = 1e-6
    numeric = np.stack(
        [
            (estimator.decision_function(rows + step * e) - estimator.decision_function(rows - step * e)) / (2 * step)
            for e in np.eye(9)
        ],
        axis=1,
    )
    np.testing.assert_allclose(gradient, numeric, rtol=1e-4, atol=1e-7)


def test_linear_and_non_linear_classifiers_are_told_apart(data):
    X = np.random.default_rng(2).normal(size=(40, 6))
    y = data[1]
    assert linear_head(LinearSVC().fit(X, y)) is not None
    assert linear_head(build_lr().fit(X, y)) is not None
    for classifier in (build_knn(), build_xgb(), build_vote(), CalibratedClassifierCV(LinearSVC(), cv=3)):
        assert linear_head(classifier.fit(X, y)) is None, classifier


def test_surrogate_fidelity_is_measured_and_can_be_low(backbones, data):
    """A near-linear model (calibrated linear SVM) gets a faithful surrogate; 5-NN on labels unrelated to the
    features gets an unfaithful one, and the numbers say so."""
    X = np.random.default_rng(3).normal(size=(200, 9))
    y = (X[:, 0] + X[:, 5] > 0).astype(int)
    near_linear = fusion_pipeline(FeatureFusion(block_sizes=[5, 4]), CalibratedClassifierCV(LinearSVC(), cv=3))
    faithful = decision_head(near_linear.fit(X, y), X, 0.5).fidelity
    noise = np.random.default_rng(4).integers(0, 2, 200)
    knn = fusion_pipeline(FeatureFusion(block_sizes=[5, 4]), build_knn()).fit(X, noise)
    unfaithful = decision_head(knn, X, 0.5).fidelity
    assert faithful.rows == unfaithful.rows == 200
    assert faithful.agreement > 0.9 and faithful.correlation > 0.9, faithful
    assert unfaithful.agreement < 0.7 and unfaithful.correlation < 0.5, unfaithful
    with pytest.raises(InputError, match=f"at least {MIN_REFERENCE_ROWS}"):
        decision_head(knn, X[:5], 0.5)


def case_paths(folder, count: int) -> list[str]:
    return [str(write_png(folder / f"case{i}.png", xray_like(i, 16, bright_blob=i % 2 == 1))) for i in range(count)]


def test_non_differentiable_model_is_explained_through_a_disclosed_surrogate(backbones, data, tmp_path):
    """xgb: the page says the model is not differentiable, names the surrogate and its fidelity, and the selected
    model's map is the first image column; without reference rows the map is left out and the page says why."""
    bundle = fitted_bundle(backbones, data, build_xgb())
    reference = bundle.features(data[0])
    paths = case_paths(tmp_path / "images", 2)
    index = explain_cases(bundle, paths, [0, 1], tmp_path / "gallery", methods=("gradcam",), reference=reference)
    page = html.unescape(index.read_text())
    fidelity = decision_head(bundle.estimator, reference, 0.5).fidelity
    title = f"Grad-CAM of the selected model fusion/x (linear surrogate, fidelity {fidelity.agreement:.2f})"
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", page)
    assert headers[1:5] == [
        "radiograph",
        title,
        "Grad-CAM of backbone a's own head (not the selected model)",
        "Grad-CAM of backbone b's own head (not the selected model)",
    ]
    assert "is not differentiable" in page and f"fitted on {len(reference)} reference images" in page
    assert (
        f"agreement {fidelity.agreement:.2f}" in page and f"correlation of log-odds {fidelity.correlation:.2f}" in page
    )

    page = html.unescape(explain_cases(bundle, paths, [0, 1], tmp_path / "bare", methods=("gradcam",)).read_text())
    assert "No Grad-CAM of the selected model fusion/x" in page and "too few for a surrogate" in page
    assert "Grad-CAM of the selected model fusion/x (" not in page and len(re.findall(r"<img ", page)) == 2 * 3


def test_exact_map_in_the_gallery(backbones, data, tmp_path):
    bundle = fitted_bundle(backbones, data, build_lr())
    paths = case_paths(tmp_path / "images", 2)
    page = explain_cases(bundle, paths, None, tmp_path / "gallery", methods=("gradcam",)).read_text()
    assert "Grad-CAM of the selected model fusion/x (exact)" in page and "is exact" in page
    images = load_batch(paths, SIZE, False)
    head = decision_head(bundle.estimator, None, 0.5)
    assert np.isfinite(selected_model_maps(bundle, images, head)).all()


def test_cases_come_from_every_outcome():
    """Round robin FN, FP, TP, TN (most confident first within each); missing outcomes are skipped."""
    test = pd.DataFrame(
        {
            "path": [f"p{i}" for i in range(8)],
            "y_true": [1, 1, 1, 0, 0, 0, 0, 1],
            "prob": [0.9, 0.8, 0.2, 0.1, 0.3, 0.95, 0.6, 0.55],
        }
    )
    picked = pick_cases(test, 0.5, 5)
    assert picked["outcome"].tolist() == ["FN", "FP", "TP", "TN", "FP"]
    assert picked["path"].tolist() == ["p2", "p5", "p0", "p3", "p6"]
    only_negatives = pick_cases(test[test["y_true"] == 0], 0.5, 3)
    assert only_negatives["outcome"].tolist() == ["FP", "TN", "FP"]
