import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from tlfusion.errors import InputError
from tlfusion.semantic.metric_learning import (
    SemanticHead,
    SemanticMetricClassifier,
    bce_loss,
    dual_weighted_metric_loss,
    evaluate_gzsl,
    inverse_frequency_weights,
    per_finding_auroc,
    weighted_focused_euclidean_loss,
)

POSITIVE, NEGATIVE = np.array([1.0, 0.0]), np.array([0.0, 1.0])


def loss_on_distances(name, y, d, **kwargs):
    """The three losses as functions of squared distances (logit = 1 - d for the logit-based ones)."""
    if name == "focused_euclidean":
        return weighted_focused_euclidean_loss(y, d, **kwargs)
    if name == "dual_weighted":
        return dual_weighted_metric_loss(y, 1.0 - d, **kwargs)
    return bce_loss(y, 1.0 - d, **kwargs)


def gradient_wrt_distances(name, y, d, **kwargs):
    d = tf.Variable(np.asarray(d, dtype=np.float32))
    with tf.GradientTape() as tape:
        value = loss_on_distances(name, tf.constant(y, tf.float32), d, **kwargs)
    return tape.gradient(value, d).numpy()


@pytest.mark.parametrize("name", ["bce", "dual_weighted", "focused_euclidean"])
def test_gradient_step_pulls_embedding_to_positive_and_pushes_from_negative(name):
    z = tf.Variable([[0.1, 0.1]])
    prototypes = tf.constant(np.stack([POSITIVE, NEGATIVE]), tf.float32)
    y = tf.constant([[1.0, 0.0]])

    def distances(points):
        return tf.reduce_sum((points[:, None, :] - prototypes[None]) ** 2, axis=-1)

    with tf.GradientTape() as tape:
        value = loss_on_distances(name, y, distances(z))
    moved = z - 0.1 * tape.gradient(value, z)
    before, after = distances(z).numpy()[0], distances(moved).numpy()[0]
    assert after[0] < before[0]
    assert after[1] > before[1]


def test_dual_weighted_loss_weighs_hard_images_more_than_bce_does():
    y = np.array([[1.0, 0.0], [1.0, 0.0]])
    d = np.array([[0.1, 3.0], [1.5, 0.5]])  # image 0 easy (near positive, far from negative), image 1 hard
    dual = np.abs(gradient_wrt_distances("dual_weighted", y, d)).sum(axis=1)
    plain = np.abs(gradient_wrt_distances("bce", y, d)).sum(axis=1)
    assert dual[1] / dual[0] > 2 * plain[1] / plain[0]
    uniform = np.abs(gradient_wrt_distances("dual_weighted", y, d, gamma=0.0)).sum(axis=1)
    np.testing.assert_allclose(uniform[1] / uniform[0], plain[1] / plain[0], rtol=1e-5)


def test_focused_euclidean_loss_weighs_hard_pairs_more_than_plain_hinge():
    y = np.array([[1.0, 1.0]])
    d = np.array([[0.7, 2.5]])  # both positives violate pos_margin=0.5; the second by far more
    focused = np.abs(gradient_wrt_distances("focused_euclidean", y, d))[0]
    hinge = np.abs(gradient_wrt_distances("focused_euclidean", y, d, gamma=0.0))[0]
    np.testing.assert_allclose(hinge[0], hinge[1])
    assert focused[1] / focused[0] > 10
    satisfied = gradient_wrt_distances("focused_euclidean", np.array([[1.0, 0.0]]), np.array([[0.2, 2.0]]))
    np.testing.assert_array_equal(satisfied, 0.0)


def test_inverse_frequency_weights_up_weight_rare_findings():
    Y = np.zeros((100, 2))
    Y[:5, 0] = 1  # rare finding
    Y[:50, 1] = 1  # common finding
    weights = inverse_frequency_weights(Y)
    assert weights[1, 0] > 5 * weights[1, 1]
    positives, negatives = Y.sum(axis=0), (1 - Y).sum(axis=0)
    np.testing.assert_allclose(weights[1] * positives, weights[0] * negatives, rtol=0.2)  # +1 smoothing
    y = np.array([[1.0, 1.0]])
    for name in ("dual_weighted", "focused_euclidean"):
        gradient = np.abs(gradient_wrt_distances(name, y, np.array([[1.0, 1.0]]), category_weights=weights))
        assert gradient[0, 0] > 5 * gradient[0, 1]


def test_bce_pos_weight_scales_positive_terms():
    y = np.array([[1.0, 1.0]])
    gradient = np.abs(gradient_wrt_distances("bce", y, np.array([[1.0, 1.0]]), pos_weight=[3.0, 1.0]))
    np.testing.assert_allclose(gradient[0, 0], 3 * gradient[0, 1], rtol=1e-5)


def identity_head(dim=3):
    head = SemanticHead(dim=dim, hidden_units=(), prototype_projection="fixed")
    head(np.zeros((1, dim), np.float32), np.eye(dim, dtype=np.float32))
    head.image_layers[0].kernel.assign(np.eye(dim))
    head.image_layers[0].bias.assign(np.zeros(dim))
    head.label_projection.kernel.assign(np.eye(dim))
    return head


def test_prototype_scores_order_findings_by_distance():
    head = identity_head()
    features = np.array([[2.0, 0.1, 0.0], [0.0, 1.0, 0.9]], np.float32)
    labels = np.eye(3, dtype=np.float32)
    distances = head.squared_distances(features, labels).numpy()
    logits = head(features, labels).numpy()
    assert list(np.argsort(-logits[0])) == [0, 1, 2]
    assert list(np.argsort(-logits[1])) == [1, 2, 0]
    scale = float(keras.ops.softplus(head.raw_scale))
    np.testing.assert_allclose(logits, float(head.bias) - scale * distances, rtol=1e-5)
    np.testing.assert_allclose(distances[0, 2], 2.0, atol=1e-5)  # orthogonal unit vectors


def test_head_connects_to_a_functional_feature_layer():
    inputs = keras.Input((5,))
    features = keras.layers.Dense(4)(inputs)
    logits = SemanticHead(dim=8, hidden_units=(6,))(features, np.ones((3, 7), np.float32))
    model = keras.Model(inputs, logits)
    assert model(np.zeros((2, 5), np.float32)).shape == (2, 3)


def synthetic_task(n=400, n_findings=8, semantic_dim=4, n_features=24, seed=0):
    """Label vectors determine features: x = (sum of the image's label vectors) A + noise."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n_findings, semantic_dim))
    Y = (rng.random((n, n_findings)) < 0.2).astype(float)
    X = Y @ vectors @ rng.normal(size=(semantic_dim, n_features)) + 0.3 * rng.normal(size=(n, n_features))
    names = [f"finding_{i}" for i in range(n_findings)]
    return X, Y, dict(zip(names, vectors, strict=True)), names


SMALL = {"dim": 32, "hidden_units": (64,), "epochs": 30}


@pytest.mark.parametrize("loss", ["bce", "dual_weighted", "focused_euclidean"])
def test_gzsl_scores_unseen_findings_through_their_prototypes(loss):
    X, Y, vectors, names = synthetic_task()
    seen, unseen = names[:6], names[6:]
    model = SemanticMetricClassifier(loss=loss, **SMALL).fit(X[:300], Y[:300, :6], vectors, seen=seen)
    scores = model.decision_function(X[300:], vectors)
    result = evaluate_gzsl(Y[300:], scores, names, seen, unseen)
    assert result["seen"] > 0.85
    assert result["unseen"] > 0.65
    assert min(result["seen"], result["unseen"]) < result["h"] < max(result["seen"], result["unseen"])
    only_unseen = model.decision_function(X[300:], {name: vectors[name] for name in unseen})
    np.testing.assert_allclose(only_unseen, scores[:, 6:], rtol=1e-5, atol=1e-5)
    probabilities = model.predict_proba(X[300:], vectors)  # per finding, positives above negatives on average
    present = Y[300:] == 1
    positives = (probabilities * present).sum(0) / present.sum(0)
    assert (positives > (probabilities * ~present).sum(0) / (~present).sum(0)).all()


def test_fit_is_deterministic_and_reads_seen_from_dataframe_columns():
    X, Y, vectors, names = synthetic_task(n=120)
    frame = pd.DataFrame(Y[:, :4], columns=names[:4])
    first = SemanticMetricClassifier(loss="dual_weighted", epochs=3).fit(X, frame, vectors)
    second = SemanticMetricClassifier(loss="dual_weighted", epochs=3).fit(X, frame, pd.DataFrame(vectors).T)
    assert first.seen_ == names[:4]
    reordered = SemanticMetricClassifier(loss="dual_weighted", epochs=3).fit(X, frame, vectors, seen=names[3::-1])
    np.testing.assert_allclose(reordered.decision_function(X, vectors), first.decision_function(X, vectors), atol=1e-4)
    np.testing.assert_array_equal(first.decision_function(X, vectors), second.decision_function(X, vectors))
    assert len(first.loss_history_) == 3


def test_bad_inputs_raise_input_error_naming_the_problem():
    X, Y, vectors, names = synthetic_task(n=40)
    model = SemanticMetricClassifier(epochs=1)
    with pytest.raises(InputError, match="finding_99"):
        model.fit(X, Y[:, :3], vectors, seen=["finding_0", "finding_1", "finding_99"])
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InputError, match="X: contains NaN"):
        model.fit(bad, Y, vectors)
    with pytest.raises(InputError, match="Y: shape"):
        model.fit(X, Y[:, :5], vectors)
    with pytest.raises(InputError, match="Y columns: unknown finding.* finding_2"):
        model.fit(X, pd.DataFrame(Y[:, :2], columns=names[:2]), vectors, seen=names[:3])
    with pytest.raises(InputError, match="loss"):
        SemanticMetricClassifier(loss="hinge").fit(X, Y, vectors)
    model.fit(X, Y, vectors)
    with pytest.raises(InputError, match="X: 3 features"):
        model.decision_function(X[:, :3], vectors)
    with pytest.raises(InputError, match="label_vectors: dimension"):
        model.decision_function(X, {"x": np.ones(2)})
    with pytest.raises(InputError, match="Pneumonitis"):
        evaluate_gzsl(Y, Y, names, names[:4], ["Pneumonitis"])


def test_per_finding_auroc_matches_sklearn_and_marks_undefined_findings():
    rng = np.random.default_rng(0)
    Y = (rng.random((50, 3)) < 0.3).astype(float)
    Y[:, 2] = 0
    scores = np.round(rng.random((50, 3)) + Y, 1)  # rounding creates ties
    auroc = per_finding_auroc(Y, scores, ["a", "b", "c"])
    for column, name in enumerate("ab"):
        assert auroc[name] == pytest.approx(roc_auc_score(Y[:, column], scores[:, column]))
    assert auroc["c"] is None


def test_evaluate_gzsl_takes_the_harmonic_mean():
    Y = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]], float)
    scores = np.array([[0.9, 0.1, 0.2], [0.2, 0.8, 0.7], [0.7, 0.15, 0.6], [0.1, 0.2, 0.8]])
    result = evaluate_gzsl(Y, scores, ["a", "b", "c"], seen=["a", "b"], unseen=["c"])
    assert result["seen"] == pytest.approx(0.875)  # a: 1.0, b: 0.75
    assert result["unseen"] == pytest.approx(0.25)
    assert result["h"] == pytest.approx(2 * 0.875 * 0.25 / (0.875 + 0.25))
