import logging

import numpy as np
import pytest
from sklearn.datasets import make_classification

from tlfusion.errors import InputError
from tlfusion.evaluation import metrics
from tlfusion.models.classifiers import CLASSIFIERS, Selection, make_classifier, select_model


@pytest.fixture(scope="module")
def separable():
    X, y = make_classification(
        n_samples=100, n_features=12, n_informative=4, n_redundant=0, class_sep=2.0, random_state=0
    )
    return X[:70], y[:70], X[70:], y[70:]


@pytest.fixture(scope="module")
def wide():
    """Few samples, many noise features, a linear signal: lr should beat knn."""
    X, y = make_classification(
        n_samples=120, n_features=200, n_informative=5, n_redundant=0, class_sep=1.5, random_state=0
    )
    return X, y, np.arange(120) // 2


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier_fits_predicts_and_is_reproducible(name, separable):
    X_train, y_train, X_test, y_test = separable
    prob = make_classifier(name, random_state=1).fit(X_train, y_train).predict_proba(X_test)
    assert prob.shape == (len(X_test), 2)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0)
    assert metrics.binary_metrics(y_test, prob[:, 1])["accuracy"] >= 0.8
    again = make_classifier(name, random_state=1).fit(X_train, y_train).predict_proba(X_test)
    np.testing.assert_array_equal(prob, again)


@pytest.mark.parametrize("name", ["rf", "xgb"])
def test_random_state_reaches_the_estimator(name, separable):
    X_train, y_train, X_test, _ = separable
    first, second = (
        make_classifier(name, random_state=seed).fit(X_train, y_train).predict_proba(X_test) for seed in (0, 1)
    )
    assert not np.array_equal(first, second)


def test_make_classifier_sets_params_by_full_or_short_key():
    assert make_classifier("lr", C=0.3).get_params()["clf__C"] == 0.3
    assert make_classifier("svm", C=2.0).get_params()["clf__estimator__C"] == 2.0
    assert make_classifier("xgb", max_depth=5).get_params()["max_depth"] == 5
    assert make_classifier("vote", lr__clf__C=0.7).get_params()["lr__clf__C"] == 0.7


def test_make_classifier_rejects_unknown_name_and_params():
    with pytest.raises(InputError, match="'svc'.*lr, svm, rf, knn, xgb, vote"):
        make_classifier("svc")
    with pytest.raises(InputError, match="unknown parameter 'depth'.*'xgb'"):
        make_classifier("xgb", depth=3)
    with pytest.raises(InputError, match="ambiguous"):
        make_classifier("vote", C=1.0)


def test_select_model_prefers_the_sensible_model(wide):
    X, y, groups = wide
    selection = select_model(X, y, groups, ["knn", "lr"], cv=5)
    assert isinstance(selection, Selection)
    assert selection.scores["lr"] > selection.scores["knn"] + 0.2
    for name in ("knn", "lr"):
        assert selection.oof_prob[name].shape == (len(y),)
        assert selection.thresholds[name] == metrics.choose_threshold(y, selection.oof_prob[name])


def test_select_model_keeps_patients_out_of_their_own_training_folds():
    """Three identical images per patient and random labels: nothing can be learned honestly."""
    rng = np.random.default_rng(0)
    X = np.repeat(rng.normal(size=(40, 8)), 3, axis=0)
    y = np.repeat(rng.integers(0, 2, 40), 3)
    patients = np.repeat(np.arange(40), 3)
    grouped = select_model(X, y, patients, ["knn"]).scores["knn"]
    assert grouped < 0.3
    # control: splitting images instead of patients lets kNN find each image's twin in training
    assert select_model(X, y, None, ["knn"]).scores["knn"] > 0.8


def test_select_model_reduces_folds_when_a_class_has_few_patients(wide, caplog):
    X, y, _ = wide
    groups = np.where(y == 1, np.arange(len(y)) % 3, 100 + np.arange(len(y)))  # positives: 3 patients
    with caplog.at_level(logging.WARNING, logger="tlfusion"):
        select_model(X, y, groups, ["lr"], cv=5)
    assert "cv: folds reduced from 5 to 3" in caplog.text
    with pytest.raises(InputError, match="fewer than 2 patient groups"):
        select_model(X, y, np.where(y == 1, 0, np.arange(len(y)) + 1), ["lr"])


def test_select_model_searches_a_small_grid(wide):
    X, y, groups = wide
    selection = select_model(X, y, groups, ["lr"], param_grid={"lr": {"C": [1e-5, 0.05]}})
    assert selection.params["lr"] in ({"C": 1e-5}, {"C": 0.05})
    with pytest.raises(InputError, match="not being selected: svm"):
        select_model(X, y, groups, ["lr"], param_grid={"svm": {"C": [1.0]}})
    with pytest.raises(InputError, match="unknown parameter 'gamma'"):
        select_model(X, y, groups, ["lr"], param_grid={"lr": {"gamma": [1.0]}})


def test_select_model_rejects_bad_inputs(separable):
    X, y, _, _ = separable
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InputError, match="features contain NaN or inf"):
        select_model(bad, y, None, ["lr"])
    with pytest.raises(InputError, match="single class|only class"):
        select_model(X, np.ones_like(y), None, ["lr"])
    with pytest.raises(InputError, match="labels but features"):
        select_model(X, y[:-1], None, ["lr"])
    with pytest.raises(InputError, match="unknown classifier 'tree'"):
        select_model(X, y, None, ["lr", "tree"])
    with pytest.raises(InputError, match="scoring"):
        select_model(X, y, None, ["lr"], scoring="loss")
    with pytest.raises(InputError, match="cv"):
        select_model(X, y, None, ["lr"], cv=1)
