"""Multi-label semantic metric learning: image embeddings and label prototypes in one metric space.

An image feature vector x is mapped to a unit vector z = f(x) and a label semantic vector s_c (a text embedding
of the finding, see `tlfusion.semantic.label_embeddings`) to a unit prototype p_c = normalize(W s_c). The score of
finding c is a negative squared Euclidean distance turned into a logit,

    d_ic = ||z_i - p_c||^2,        l_ic = b - a * d_ic   (a = softplus(alpha) > 0, b shared by all findings),

so a finding never seen in training is scored through its prototype alone (generalised zero-shot learning).
Losses follow the spirit of Jin et al. 2023 (dual-weighted metric loss) and of the weighted focused Euclidean
distance loss for multi-label GZSL on chest X-rays; the exact formulas are the ones in the docstrings below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from tlfusion.config.names import LOSSES
from tlfusion.errors import InputError
from tlfusion.evaluation.multilabel_metrics import multilabel_auroc

PROTOTYPE_PROJECTIONS = ("learned", "fixed")


class SemanticHead(keras.layers.Layer):
    """Projects image features and label vectors into one metric space; returns logits ``b - a·d``.

    ``head(features [n, d], label_vectors [C, s]) -> logits [n, C]``. Images pass through ``hidden_units``
    ReLU Dense layers and a linear Dense(``dim``); label vectors through a linear map W initialised as a
    random orthogonal projection, trained (``"learned"``) or frozen (``"fixed"``). Both sides are
    L2-normalised, so ``d`` lies in [0, 4]. Works on a backbone's feature tensor in the functional API.
    """

    def __init__(
        self,
        dim: int = 128,
        hidden_units: Sequence[int] = (256,),
        prototype_projection: str = "learned",
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if prototype_projection not in PROTOTYPE_PROJECTIONS:
            raise InputError(f"prototype_projection: expected one of {PROTOTYPE_PROJECTIONS}")
        self.dim = dim
        self.hidden_units = tuple(hidden_units)
        self.prototype_projection = prototype_projection
        self.seed = seed
        self.image_layers = [
            keras.layers.Dense(units, activation="relu", kernel_initializer=_glorot(seed + i))
            for i, units in enumerate(self.hidden_units)
        ]
        self.image_layers.append(keras.layers.Dense(dim, kernel_initializer=_glorot(seed + len(hidden_units))))
        self.label_projection = keras.layers.Dense(
            dim,
            use_bias=False,
            trainable=prototype_projection == "learned",
            kernel_initializer=keras.initializers.Orthogonal(seed=seed + len(hidden_units) + 1),
        )
        self.raw_scale = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(_softplus_inverse(4.0)), name="raw_scale"
        )
        self.bias = self.add_weight(shape=(), initializer=keras.initializers.Constant(6.0), name="bias")

    def embed_images(self, features):
        """Unit-length image embeddings z [n, dim]."""
        z = features
        for layer in self.image_layers:
            z = layer(z)
        return ops.normalize(z, axis=-1)

    def embed_labels(self, label_vectors):
        """Unit-length label prototypes p [C, dim]."""
        return ops.normalize(self.label_projection(label_vectors), axis=-1)

    def squared_distances(self, features, label_vectors):
        """d [n, C] = ||z_i - p_c||^2."""
        z = self.embed_images(features)
        p = self.embed_labels(label_vectors)
        cross = ops.matmul(z, ops.transpose(p))
        d = ops.sum(z * z, axis=1)[:, None] + ops.sum(p * p, axis=1)[None, :] - 2.0 * cross
        return ops.maximum(d, 0.0)

    def distance_logits(self, squared_distances):
        """l = b - softplus(alpha) * d."""
        return self.bias - ops.softplus(self.raw_scale) * squared_distances

    def call(self, features, label_vectors):
        return self.distance_logits(self.squared_distances(features, label_vectors))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "dim": self.dim,
            "hidden_units": list(self.hidden_units),
            "prototype_projection": self.prototype_projection,
            "seed": self.seed,
        }


def bce_loss(y_true, logits, pos_weight=None):
    """Binary cross-entropy, the baseline.

    L = -1/(N C) * sum_ic [ w_c * y_ic * log sigmoid(l_ic) + (1 - y_ic) * log(1 - sigmoid(l_ic)) ],
    with w_c = ``pos_weight[c]`` (e.g. n_neg/n_pos against class imbalance) or 1.
    """
    y = ops.cast(y_true, logits.dtype)
    positive = y * ops.log_sigmoid(logits)
    if pos_weight is not None:
        positive = positive * ops.cast(pos_weight, logits.dtype)
    return -ops.mean(positive + (1.0 - y) * ops.log_sigmoid(-logits))


def dual_weighted_metric_loss(y_true, logits, category_weights=None, gamma: float = 2.0):
    """Distance-logit cross-entropy weighted at image level (hard images) and category level (rare classes).

    With pair loss  e_ic = -[y_ic log sigmoid(l_ic) + (1 - y_ic) log(1 - sigmoid(l_ic))]  and l = b - a·d:

    - image level:    h_i = (1 - exp(-mean_c e_ic))^gamma,  v_i = N h_i / sum_j h_j   (no gradient through v);
      exp(-mean_c e_ic) is the geometric-mean probability the model gives image i's true labels,
      so badly classified images weigh more (gamma = 0: all v_i = 1);
    - category level: u_ic = category_weights[1, c] if y_ic = 1 else category_weights[0, c]
      (`inverse_frequency_weights`: rare positives weigh more; None: all 1);

    L = 1/(N C) * sum_ic v_i * u_ic * e_ic.
    """
    y = ops.cast(y_true, logits.dtype)
    pair = -(y * ops.log_sigmoid(logits) + (1.0 - y) * ops.log_sigmoid(-logits))
    hardness = (1.0 - ops.exp(-ops.mean(pair, axis=1))) ** gamma
    image_weight = ops.stop_gradient(hardness / (ops.mean(hardness) + 1e-12))
    return ops.mean(image_weight[:, None] * _pair_weights(y, category_weights) * pair)


def weighted_focused_euclidean_loss(
    y_true,
    squared_distances,
    category_weights=None,
    pos_margin: float = 0.5,
    neg_margin: float = 1.5,
    gamma: float = 2.0,
):
    """Pull images within ``pos_margin`` of their positive prototypes, push them beyond ``neg_margin`` of the rest.

    With d_ic = ||z_i - p_c||^2:

    - hinge:  e_ic = y_ic * max(0, d_ic - pos_margin) + (1 - y_ic) * max(0, neg_margin - d_ic);
    - focus:  like focal loss (FL = (1 - exp(-CE))^gamma * CE), pairs are weighted by (1 - exp(-e_ic))^gamma,
      so satisfied and nearly satisfied pairs fade out and hard pairs dominate (gamma = 0: plain hinge);
    - category weights u_ic as in `dual_weighted_metric_loss`;

    L = 1/(N C) * sum_ic u_ic * (1 - exp(-e_ic))^gamma * e_ic.
    """
    d = squared_distances
    y = ops.cast(y_true, d.dtype)
    hinge = y * ops.relu(d - pos_margin) + (1.0 - y) * ops.relu(neg_margin - d)
    focus = (1.0 - ops.exp(-hinge)) ** gamma
    return ops.mean(_pair_weights(y, category_weights) * focus * hinge)


def inverse_frequency_weights(Y: np.ndarray) -> np.ndarray:
    """Category weights [2, C] (row 0: negatives, row 1: positives) from a training label matrix.

    With prevalence pi_c = (n_pos_c + 1) / (N + 2):  w_pos_c = 1 / (2 pi_c),  w_neg_c = 1 / (2 (1 - pi_c)),
    so positives and negatives of every finding carry the same total weight and rare findings are not drowned.
    """
    Y = np.asarray(Y, dtype=np.float64)
    prevalence = (Y.sum(axis=0) + 1.0) / (len(Y) + 2.0)
    return np.stack([0.5 / (1.0 - prevalence), 0.5 / prevalence]).astype(np.float32)


class SemanticMetricClassifier(BaseEstimator):
    """Multi-label classifier scoring findings by distance to their semantic prototypes (supports GZSL).

    ``fit(X, Y, label_vectors, seen)`` trains a `SemanticHead` on the ``seen`` findings (the columns of Y);
    ``decision_function(X, label_vectors)`` scores every finding in ``label_vectors``, seen or not.
    ``label_vectors`` maps finding name -> vector (a dict, or a DataFrame indexed by name). Features are
    standardised and label vectors centred on the seen findings' mean, both with statistics learned in fit.

    loss: ``"bce"`` (`bce_loss` on distance logits), ``"dual_weighted"`` (`dual_weighted_metric_loss` with
    `inverse_frequency_weights`) or ``"focused_euclidean"`` (`weighted_focused_euclidean_loss` with the same
    category weights; the logit scale and bias are then fitted by BCE on the distances with no gradient into
    the embeddings, a calibration only). ``gamma``: hard-sample focusing exponent (image level for
    dual_weighted, pair level for focused_euclidean). ``margins``: (pos_margin, neg_margin) of the focused loss.
    """

    def __init__(
        self,
        loss: str = "bce",
        dim: int = 128,
        hidden_units: Sequence[int] = (256,),
        prototype_projection: str = "learned",
        gamma: float = 2.0,
        margins: tuple[float, float] = (0.5, 1.5),
        epochs: int = 60,
        lr: float = 1e-3,
        batch_size: int = 64,
        random_state: int = 0,
    ):
        self.loss = loss
        self.dim = dim
        self.hidden_units = hidden_units
        self.prototype_projection = prototype_projection
        self.gamma = gamma
        self.margins = margins
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.random_state = random_state

    def fit(self, X, Y, label_vectors, seen: Sequence[str] | None = None) -> SemanticMetricClassifier:
        """Train on features X [n, d] and labels Y [n, len(seen)] (a DataFrame's columns are picked by name).

        ``seen`` defaults to Y's columns for a DataFrame, else to every finding of ``label_vectors``.
        """
        if self.loss not in LOSSES:
            raise InputError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        X = _check_matrix(X, "X")
        names, vectors = _label_table(label_vectors)
        if seen is None:
            seen = list(Y.columns) if hasattr(Y, "columns") else names
        seen = list(seen)
        _check_known(seen, names, "seen")
        if len(seen) < 2 or len(set(seen)) != len(seen):
            raise InputError("seen: at least two findings are needed, each named once")
        if hasattr(Y, "columns"):
            _check_known(seen, list(Y.columns), "Y columns")
            Y = Y[seen]
        Y = _check_targets(Y, n_samples=len(X), n_labels=len(seen))
        seen_vectors = vectors[[names.index(name) for name in seen]]

        self.n_features_in_ = X.shape[1]
        self.semantic_dim_ = vectors.shape[1]
        self.seen_ = seen
        self.feature_mean_ = X.mean(axis=0)
        self.feature_scale_ = np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0)
        self.label_vector_mean_ = seen_vectors.mean(axis=0)
        self.head_ = SemanticHead(self.dim, self.hidden_units, self.prototype_projection, seed=self.random_state)
        self.loss_history_ = self._train(self._standardise(X), Y, seen_vectors - self.label_vector_mean_)
        return self

    def decision_function(self, X, label_vectors) -> np.ndarray:
        """Logits [n, C] for the findings of ``label_vectors``, in its order."""
        check_is_fitted(self, "head_")
        X = _check_matrix(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise InputError(f"X: {X.shape[1]} features, the model was fitted on {self.n_features_in_}")
        _, vectors = _label_table(label_vectors)
        if vectors.shape[1] != self.semantic_dim_:
            raise InputError(f"label_vectors: dimension {vectors.shape[1]}, fitted on {self.semantic_dim_}")
        logits = self.head_(self._standardise(X), (vectors - self.label_vector_mean_).astype(np.float32))
        return ops.convert_to_numpy(logits)

    def predict_proba(self, X, label_vectors) -> np.ndarray:
        """Probability [n, C] that each finding of ``label_vectors`` is present."""
        return 1.0 / (1.0 + np.exp(-self.decision_function(X, label_vectors)))

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.feature_mean_) / self.feature_scale_).astype(np.float32)

    def _train(self, X: np.ndarray, Y: np.ndarray, seen_vectors: np.ndarray) -> list[float]:
        head = self.head_
        prototypes_in = tf.constant(seen_vectors, dtype=tf.float32)
        weights = tf.constant(inverse_frequency_weights(Y))
        optimizer = keras.optimizers.Adam(learning_rate=self.lr)
        head(X[:1], prototypes_in)  # builds the weights

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                value = self._objective(head.squared_distances(x, prototypes_in), y, weights)
            gradients = tape.gradient(value, head.trainable_variables)
            optimizer.apply_gradients(zip(gradients, head.trainable_variables, strict=True))
            return value

        rng = np.random.default_rng(self.random_state)
        history = []
        for _ in range(self.epochs):
            order = rng.permutation(len(X))
            losses = [
                float(step(X[batch], Y[batch]))
                for batch in np.array_split(order, max(1, math.ceil(len(X) / self.batch_size)))
            ]
            history.append(float(np.mean(losses)))
        return history

    def _objective(self, squared_distances, y, category_weights):
        logits = self.head_.distance_logits(squared_distances)
        if self.loss == "bce":
            return bce_loss(y, logits)
        if self.loss == "dual_weighted":
            return dual_weighted_metric_loss(y, logits, category_weights, self.gamma)
        calibration = bce_loss(y, self.head_.distance_logits(ops.stop_gradient(squared_distances)))
        pos_margin, neg_margin = self.margins
        metric = weighted_focused_euclidean_loss(
            y, squared_distances, category_weights, pos_margin, neg_margin, self.gamma
        )
        return metric + calibration


def per_finding_auroc(Y_true, scores, names: Sequence[str]) -> dict[str, float | None]:
    """AUROC of each finding (column of Y_true/scores), ``None`` where a finding has only one class."""
    auroc = multilabel_auroc(Y_true, scores, names)
    return {name: auroc[name] for name in names}


def evaluate_gzsl(Y_true, scores, names: Sequence[str], seen: Sequence[str], unseen: Sequence[str]) -> dict[str, float]:
    """GZSL summary: mean AUROC over seen findings, over unseen findings, and their harmonic mean h.

    All findings are scored together (seen and unseen prototypes side by side);
    h = 2 * seen * unseen / (seen + unseen). Findings with an undefined AUROC are left out of the means.
    """
    names = list(names)
    _check_known([*seen, *unseen], names, "seen/unseen")
    auroc = per_finding_auroc(Y_true, scores, names)
    result = {}
    for group, members in (("seen", seen), ("unseen", unseen)):
        defined = [auroc[name] for name in members if auroc[name] is not None]
        if not defined:
            raise InputError(f"{group}: no finding has both positive and negative examples in Y_true")
        result[group] = float(np.mean(defined))
    result["h"] = 2 * result["seen"] * result["unseen"] / (result["seen"] + result["unseen"])
    return result


def _pair_weights(y, category_weights):
    if category_weights is None:
        return ops.ones_like(y)
    weights = ops.cast(category_weights, y.dtype)
    return y * weights[1][None, :] + (1.0 - y) * weights[0][None, :]


def _label_table(label_vectors) -> tuple[list[str], np.ndarray]:
    if hasattr(label_vectors, "index") and hasattr(label_vectors, "to_numpy"):
        names, rows = [str(name) for name in label_vectors.index], label_vectors.to_numpy()
    elif isinstance(label_vectors, Mapping):
        names, rows = [str(name) for name in label_vectors], list(label_vectors.values())
    else:
        raise InputError("label_vectors: expected a mapping finding name -> vector (dict or DataFrame)")
    try:
        matrix = np.asarray(rows, dtype=np.float32)
    except ValueError as error:
        raise InputError("label_vectors: vectors must be numbers, all of one length") from error
    if matrix.ndim != 2 or len(names) == 0:
        raise InputError("label_vectors: vectors must be non-empty and all of one length")
    if not np.isfinite(matrix).all():
        raise InputError("label_vectors: contains NaN or infinite values")
    return names, matrix


def _check_known(requested: Sequence[str], known: Sequence[str], key: str) -> None:
    known = set(known)
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise InputError(f"{key}: unknown finding(s) {', '.join(map(str, unknown))} (not in label_vectors/names)")


def _check_matrix(values, key: str) -> np.ndarray:
    try:
        matrix = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise InputError(f"{key}: expected a numeric matrix") from error
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise InputError(f"{key}: expected a non-empty 2-D matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise InputError(f"{key}: contains NaN or infinite values")
    return matrix


def _check_targets(Y, n_samples: int, n_labels: int) -> np.ndarray:
    Y = _check_matrix(Y, "Y")
    if Y.shape != (n_samples, n_labels):
        raise InputError(f"Y: shape {Y.shape}, expected ({n_samples}, {n_labels}) (samples x findings)")
    if not np.isin(Y, (0.0, 1.0)).all():
        raise InputError("Y: labels must be 0 or 1")
    return Y.astype(np.float32)


def _glorot(seed: int) -> keras.initializers.Initializer:
    return keras.initializers.GlorotUniform(seed=seed)


def _softplus_inverse(value: float) -> float:
    return math.log(math.expm1(value))
