"""Grad-CAM of the selected model: the saliency of the decision the bundle makes, through fusion and classifier.

A bundle scores an image x as s = head(fusion(f)), f the backbones' features side by side. Each backbone's
features are the global average of its last convolution's maps A [h, w, c] (averaged with the mirrored image's
when the bundle flips), so ds/dA[i, j, k] = g_k / (h w) with g = ds/df. Grad-CAM with the decision as its target
is then, up to the constant 1 / (h w), the map sum_k g_k A[i, j, k], whose mean over pixels is the backbone's
first-order contribution g . f. Each backbone's map is resized to the input, the maps of all backbones are summed,
and the sum goes through ReLU and is divided by its maximum.

g is exact when the classifier is linear in the fusion's output (logistic regression, a linear SVM, the other
`LINEAR_CLASSIFIERS`, behind StandardScaler / PCA steps): its weights pulled back through the fusion's
standardisation (divide by the scale), block L2 normalisation (its Jacobian at f) and PCA (times the components).
Other classifiers (trees, k-NN, an RBF SVM, a vote) are replaced by a disclosed surrogate: a ridge regression of
the model's log-odds on the fusion's output, fitted on reference rows, with its fidelity measured out of fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.linear_model import (
    LogisticRegression,
    LogisticRegressionCV,
    Perceptron,
    RidgeClassifier,
    RidgeClassifierCV,
    RidgeCV,
    SGDClassifier,
)
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from tlfusion.backbones.registry import gradcam_layer_name
from tlfusion.errors import InputError

MIN_REFERENCE_ROWS = 20
"""Fewest reference rows a surrogate is fitted on (its fidelity is measured in `SURROGATE_FOLDS` folds)."""
SURROGATE_FOLDS = 5
SURROGATE_ALPHAS = np.logspace(-2, 4, 13)
_PROBABILITY_CLIP = 1e-6
LINEAR_CLASSIFIERS = (
    LogisticRegression,
    LogisticRegressionCV,
    LinearSVC,
    SGDClassifier,
    RidgeClassifier,
    RidgeClassifierCV,
    Perceptron,
)
"""Classifiers whose decision function is x @ coef_ + intercept_."""


@dataclass(frozen=True)
class LinearHead:
    """score = z @ coef + intercept, z the fusion's output."""

    coef: np.ndarray
    intercept: float


@dataclass(frozen=True)
class Fidelity:
    """How well a surrogate follows the model, out of fold on `rows` reference rows: the share of rows on which
    both decide the same class at the model's threshold, and the correlation of their log-odds."""

    agreement: float
    correlation: float
    rows: int


@dataclass(frozen=True)
class DecisionHead:
    """The head whose gradients the selected-model map follows: the classifier itself (`fidelity` None) or a
    surrogate of it."""

    head: LinearHead
    fidelity: Fidelity | None = None

    @property
    def exact(self) -> bool:
        return self.fidelity is None

    def title(self, model: str) -> str:
        """The image label, e.g. "Grad-CAM of the selected model fusion/lr (exact)"."""
        how = "exact" if self.exact else f"linear surrogate, fidelity {self.fidelity.agreement:.2f}"
        return f"Grad-CAM of the selected model {model} ({how})"


def linear_head(classifier, column: int = 1) -> LinearHead | None:
    """The classifier as a linear head on its input, or None when its decision is not linear in it.

    Accepted: a model of `LINEAR_CLASSIFIERS`, alone or as the last step of a Pipeline whose other steps are
    StandardScaler or PCA (folded into the weights); binary (one weight row, the positive class: `column` 1), or
    K-class with one row per class (the class logit of `column`).
    """
    steps = [step for _, step in classifier.steps] if isinstance(classifier, Pipeline) else [classifier]
    *transforms, last = steps
    if not isinstance(last, LINEAR_CLASSIFIERS):
        return None
    rows = np.shape(last.coef_)[0]
    row = 0 if rows == 1 and column == 1 else column if rows > 2 and 0 <= column < rows else None
    if row is None or not all(isinstance(step, StandardScaler | PCA) for step in transforms):
        return None
    coef, intercept = np.asarray(last.coef_, np.float64)[row], float(np.ravel(last.intercept_)[row])
    for step in reversed(transforms):
        coef, intercept = _pull_back_affine(step, coef, intercept)
    return LinearHead(coef, intercept)


def _pull_back_affine(step: StandardScaler | PCA, coef: np.ndarray, intercept: float) -> tuple[np.ndarray, float]:
    """(coef, intercept) on the step's input, for a head (coef, intercept) on its output."""
    if isinstance(step, StandardScaler):
        scale = step.scale_ if step.scale_ is not None else np.ones_like(coef)
        mean = step.mean_ if step.mean_ is not None else np.zeros_like(coef)
        return coef / scale, intercept - float((mean / scale) @ coef)
    weights = coef / np.sqrt(step.explained_variance_) if step.whiten else coef
    return weights @ step.components_, intercept - float(step.mean_ @ (weights @ step.components_))


def decision_head(
    estimator: Pipeline, reference: np.ndarray | None, threshold: float, seed: int = 0, column: int = 1
) -> DecisionHead:
    """The selected model's own linear head, or a ridge surrogate of its log-odds fitted on `reference` (feature
    rows the estimator takes; at least `MIN_REFERENCE_ROWS`, else InputError), for probability column `column`
    (the positive class of a binary model, any class of a K-class one; `threshold` on that column's scale)."""
    fusion, classifier = (step for _, step in estimator.steps)
    head = linear_head(classifier, column)
    if head is not None:
        return DecisionHead(head)
    if reference is None or len(reference) < MIN_REFERENCE_ROWS:
        rows = 0 if reference is None else len(reference)
        raise InputError(
            f"the selected classifier is not linear and {rows} reference rows are too few for a surrogate "
            f"(at least {MIN_REFERENCE_ROWS})"
        )
    Z = fusion.transform(reference)
    target = _log_odds(estimator.predict_proba(reference)[:, column])
    surrogate = make_pipeline(StandardScaler(), RidgeCV(alphas=SURROGATE_ALPHAS))
    folds = KFold(SURROGATE_FOLDS, shuffle=True, random_state=seed)
    out_of_fold = cross_val_predict(clone(surrogate), Z, target, cv=folds)
    cut = _log_odds(np.array([threshold]))[0]
    fidelity = Fidelity(
        agreement=float(np.mean((out_of_fold >= cut) == (target >= cut))),
        correlation=float(np.corrcoef(out_of_fold, target)[0, 1]) if np.std(out_of_fold) > 0 else 0.0,
        rows=len(reference),
    )
    scaler, ridge = (step for _, step in surrogate.fit(Z, target).steps)
    return DecisionHead(LinearHead(*_pull_back_affine(scaler, ridge.coef_, float(ridge.intercept_))), fidelity)


def _log_odds(probability: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probability, np.float64), _PROBABILITY_CLIP, 1 - _PROBABILITY_CLIP)
    return np.log(p) - np.log1p(-p)


def feature_gradient(fusion, head: LinearHead, X: np.ndarray) -> np.ndarray:
    """d(score)/dX [n, d] at feature rows X, back through a fitted `FeatureFusion` (`FeatureFusion.backward`)."""
    return fusion.backward(X, head.coef)


def contribution_maps(bundle, images: np.ndarray, gradient: np.ndarray) -> dict[str, np.ndarray]:
    """Per backbone, sum_k g_k A[i, j, k] at the last convolution (h, w of that layer), for images [n, s, s, 1]
    and the feature gradient [n, d] (`feature_gradient`); with `bundle.flip`, a second entry "<name>|flipped"
    holds the maps of the mirrored images (not mirrored back), each half-weighted as the features are."""
    views = [images, np.ascontiguousarray(images[:, :, ::-1])] if bundle.flip else [images]
    grads = dict(zip(bundle.models, bundle.fusion.blocks(gradient), strict=True))
    maps = {}
    for name, model in bundle.models.items():
        activations_of = keras.Model(model.input, model.get_layer(gradcam_layer_name(model)).output)
        for view, suffix in zip(views, ("", "|flipped"), strict=False):
            activations = np.asarray(activations_of(view, training=False), np.float64)  # eager: no retracing
            if activations.shape[-1] != grads[name].shape[1]:
                raise InputError(
                    f"backbone {name!r}: {activations.shape[-1]} channels at its last convolution but "
                    f"{grads[name].shape[1]} features in the bundle; the selected-model map needs one-stage features"
                )
            maps[name + suffix] = np.einsum("nhwc,nc->nhw", activations, grads[name]) / len(views)
    return maps


def selected_model_maps(bundle, images: np.ndarray, head: DecisionHead) -> np.ndarray:
    """Maps [n, s, s] in [0, 1] of the selected model's decision for images [n, s, s, 1] (see the module doc)."""
    images = np.asarray(images, np.float32)
    gradient = feature_gradient(bundle.fusion, head.head, bundle.features(images))
    size = images.shape[1:3]
    total = np.zeros((len(images), *size), np.float64)
    for name, maps in contribution_maps(bundle, images, gradient).items():
        resized = tf.image.resize(maps[..., None], size, method="bilinear").numpy()[..., 0]
        total += resized[:, :, ::-1] if name.endswith("|flipped") else resized
    total = np.maximum(total, 0)
    peaks = total.max(axis=(1, 2), keepdims=True)
    return np.divide(total, peaks, out=np.zeros_like(total), where=peaks > 0).astype(np.float32)


def exact_head_note(model: str, gradient_of: str) -> str:
    """The review page's note on an exact Grad-CAM of the selected model (a classifier linear in the features)."""
    return (
        f"Grad-CAM of the selected model {model} is exact: its classifier is linear in the fused features, so "
        f"the gradient of {gradient_of} flows through the classifier and the fusion into each backbone's "
        "last convolution; the backbones' maps are summed."
    )
