import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tlfusion.errors import InputError
from tlfusion.fewshot.episodes import sample_episodes
from tlfusion.fewshot.evaluation import (
    FEWSHOT_CLASSIFIERS,
    KNNFewShotClassifier,
    PrototypeClassifier,
    SimpleShotClassifier,
    evaluate_episodes,
    make_fewshot_classifier,
    plot_shots_curve,
    run_fewshot,
    shots_curve,
)


def make_features(n_classes=3, patients=30, images=2, separation=6.0, dim=16, seed=0):
    """Gaussian blobs (separation=0 gives pure noise); ``images`` rows per patient, string labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"class{c}" for c in range(n_classes)], patients * images)
    groups = np.repeat([f"p{i}" for i in range(n_classes * patients)], images)
    centres = rng.normal(size=(n_classes, dim)) * separation
    X = centres[np.repeat(np.arange(n_classes), patients * images)] + rng.normal(size=(len(labels), dim))
    return X.astype(np.float32), labels, groups


def test_episode_counts_and_labels():
    X, y, g = make_features()
    episodes = sample_episodes(y, g, ways=2, shots=3, queries=4, episodes=20)
    assert len(episodes) == 20
    for episode in episodes:
        assert len(episode.classes) == 2
        assert len(episode.support_idx) == 6 and len(episode.query_idx) == 8
        np.testing.assert_array_equal(y[episode.support_idx], episode.support_y)
        np.testing.assert_array_equal(y[episode.query_idx], episode.query_y)
        for label in episode.classes:
            assert (episode.support_y == label).sum() == 3 and (episode.query_y == label).sum() == 4


def test_supports_and_queries_never_share_a_patient_even_across_classes():
    X, y, g = make_features(n_classes=2, patients=12, images=3)
    g = g.copy()
    g[y == "class1"] = np.repeat([f"p{i}" for i in range(6, 18)], 3)  # p6..p11 carry both labels
    assert len(np.intersect1d(g[y == "class0"], g[y == "class1"])) > 0
    for episode in sample_episodes(y, g, ways=2, shots=2, queries=3, episodes=200, seed=3):
        support_patients, query_patients = g[episode.support_idx], g[episode.query_idx]
        assert not set(support_patients) & set(query_patients)
        for label in episode.classes:
            assert len(set(support_patients[episode.support_y == label])) == 2
            assert len(set(query_patients[episode.query_y == label])) == 3


def test_sampler_is_seeded():
    X, y, g = make_features()
    first, again = (sample_episodes(y, g, 2, 2, 3, 10, seed=7) for _ in range(2))
    other = sample_episodes(y, g, 2, 2, 3, 10, seed=8)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.support_idx, b.support_idx)
        np.testing.assert_array_equal(a.query_idx, b.query_idx)
    assert any(not np.array_equal(a.query_idx, b.query_idx) for a, b in zip(first, other, strict=True))


def test_fixed_classes_and_random_class_draws():
    X, y, g = make_features(n_classes=4)
    fixed = sample_episodes(y, g, 2, 1, 1, 30, classes=["class3", "class1"])
    assert all(list(episode.classes) == ["class1", "class3"] for episode in fixed)
    drawn = {tuple(episode.classes) for episode in sample_episodes(y, g, 2, 1, 1, 60)}
    assert len(drawn) > 1


def test_too_few_patients_names_the_class_and_counts():
    X, y, g = make_features(patients=10, images=3)
    with pytest.raises(InputError, match=r"class 'class0' has 10 patients, needs 12"):
        sample_episodes(y, g, 2, 5, 7, 5, classes=["class0", "class1"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ways": 4}, "only 3 classes"),
        ({"ways": 1}, "at least 2"),
        ({"shots": 0}, "shots=0"),
        ({"classes": ["class0", "nope"]}, "not in the labels"),
    ],
)
def test_sampler_rejects_bad_settings(kwargs, message):
    X, y, g = make_features()
    settings = {"ways": 2, "shots": 1, "queries": 1, "episodes": 3} | kwargs
    with pytest.raises(InputError, match=message):
        sample_episodes(y, g, **settings)


@pytest.mark.parametrize("name", sorted(FEWSHOT_CLASSIFIERS))
def test_classifier_separates_blobs(name):
    X, y, g = make_features()
    episodes = sample_episodes(y, g, 2, 5, 10, 40, seed=1)
    result = evaluate_episodes(X, y, episodes, name)
    assert result["auroc"]["mean"] > 0.95
    assert result["accuracy"]["mean"] > 0.9


@pytest.mark.parametrize("name", sorted(FEWSHOT_CLASSIFIERS))
def test_classifier_on_noise_is_chance(name):
    X, y, g = make_features(separation=0.0, patients=40)
    episodes = sample_episodes(y, g, 2, 5, 15, 150, seed=2)
    result = evaluate_episodes(X, y, episodes, name)
    assert abs(result["auroc"]["mean"] - 0.5) < 0.05
    assert abs(result["accuracy"]["mean"] - 0.5) < 0.05


@pytest.mark.parametrize("ways", [2, 3])
def test_episode_auroc_matches_sklearn(ways):
    X, y, g = make_features(separation=0.4)
    episodes = sample_episodes(y, g, ways, 2, 5, 15, seed=4)
    per_episode = evaluate_episodes(X, y, episodes, "prototype")["auroc"]["per_episode"]
    for episode, auroc in zip(episodes, per_episode, strict=True):
        clf = PrototypeClassifier().fit(X[episode.support_idx], episode.support_y)
        proba = clf.predict_proba(X[episode.query_idx])
        expected = roc_auc_score(episode.query_y, proba[:, 1] if ways == 2 else proba, multi_class="ovr")
        assert auroc == pytest.approx(expected)


def test_tied_scores_count_one_half():
    X, y, g = make_features(n_classes=2, separation=0.3)
    episodes = sample_episodes(y, g, 2, 3, 6, 20, seed=6)
    hard_votes = KNNFewShotClassifier(n_neighbors=1, weights="uniform")
    per_episode = evaluate_episodes(X, y, episodes, hard_votes)["auroc"]["per_episode"]
    for episode, auroc in zip(episodes, per_episode, strict=True):
        predicted = hard_votes.fit(X[episode.support_idx], episode.support_y).predict(X[episode.query_idx])
        recalls = [np.mean(predicted[episode.query_y == label] == label) for label in episode.classes]
        assert auroc == pytest.approx(np.mean(recalls))  # AUROC of 0/1 scores is balanced accuracy


def test_prototype_ranks_survive_softmax_saturation():
    supports = np.array([[0.0, 0.0], [1000.0, 0.0]])
    queries = np.array([[100.0, 0.0], [200.0, 0.0], [300.0, 0.0]])
    clf = PrototypeClassifier().fit(supports, ["a", "b"])
    np.testing.assert_array_equal(clf.predict_proba(queries)[:, 0], 1.0)  # plain softmax ties them
    log_b = clf.predict_log_proba(queries)[:, 1]
    log_a = clf.predict_log_proba(queries)[:, 0]
    assert np.all(np.diff(log_b) > 0) and np.all(np.diff(log_a) < 0)


def test_simpleshot_uses_the_base_mean():
    X, y, g = make_features(dim=4)
    base = X[:20]
    clf = SimpleShotClassifier.from_base_set(base).fit(X[40:60], y[40:60])
    np.testing.assert_allclose(clf.mean_, base.mean(axis=0), rtol=1e-6)
    assert SimpleShotClassifier().fit(X[40:60], y[40:60]).mean_ == pytest.approx(X[40:60].mean(axis=0))
    with pytest.raises(InputError, match="base_mean has shape"):
        SimpleShotClassifier(base_mean=np.zeros(3)).fit(X, y)


def test_knn_caps_neighbours_at_the_support_count():
    clf = KNNFewShotClassifier(n_neighbors=5).fit([[0.0], [10.0]], [0, 1])
    proba = clf.predict_proba([[1.0], [4.0], [9.0]])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert np.all(np.diff(proba[:, 1]) > 0)
    np.testing.assert_array_equal(clf.predict([[1.0], [9.0]]), [0, 1])


def test_episode_interval_shrinks_with_more_episodes():
    X, y, g = make_features(separation=0.3)
    widths = []
    for n_episodes in (20, 400):
        ci = run_fewshot(X, y, g, 2, 1, 5, n_episodes, "prototype")["auroc"]["episode_ci95"]
        assert ci[0] < ci[1]
        widths.append(ci[1] - ci[0])
    assert widths[1] < widths[0] / 2


def test_run_fewshot_schema_and_seed():
    X, y, g = make_features()
    record = run_fewshot(X, y, g, ways=2, shots=3, queries=5, episodes=10, classifier="knn", seed=5)
    assert set(record) == {
        "ways",
        "shots",
        "queries",
        "episodes",
        "classifier",
        "seed",
        "auroc",
        "accuracy",
        "per_class",
        "interval",
    }
    assert (record["ways"], record["shots"], record["queries"], record["episodes"]) == (2, 3, 5, 10)
    assert (record["classifier"], record["seed"]) == ("knn", 5)
    for metric in ("auroc", "accuracy"):
        assert set(record[metric]) == {"mean", "ci95", "episode_ci95", "episode_std"}
        for interval in ("ci95", "episode_ci95"):
            low, high = record[metric][interval]
            assert low <= record[metric]["mean"] <= high
    assert record["interval"]["patients"] == 90 and record["interval"]["estimable"]
    assert record["per_class"]["class0"] == {"images": 60, "patients": 30}
    assert json.loads(json.dumps(record)) == record
    assert run_fewshot(X, y, g, 2, 3, 5, 10, "knn", seed=5) == record


def test_run_fewshot_accepts_integer_labels():
    X, y, g = make_features()
    codes = np.unique(y, return_inverse=True)[1]
    record = run_fewshot(X, codes, g, 3, 2, 3, 5, "simpleshot")
    assert set(record["per_class"]) == {"0", "1", "2"}
    assert record["auroc"]["mean"] > 0.9


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda X, y, g: (np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X), y, g), "NaN or inf"),
        (lambda X, y, g: (np.where(np.arange(X.size).reshape(X.shape) == 5, np.inf, X), y, g), "NaN or inf"),
        (lambda X, y, g: (X, y[:-1], g), "labels"),
        (lambda X, y, g: (X, y, g[:-1]), "groups"),
        (lambda X, y, g: (X[:, 0], y, g), "2-D"),
    ],
)
def test_run_fewshot_rejects_bad_inputs(change, message):
    X, y, g = change(*make_features())
    with pytest.raises(InputError, match=message):
        run_fewshot(X, y, g, 2, 1, 1, 5, "prototype")


def test_unknown_classifier_and_single_episode_are_input_errors():
    X, y, g = make_features()
    with pytest.raises(InputError, match="unknown classifier 'svm'"):
        make_fewshot_classifier("svm")
    with pytest.raises(InputError, match="at least 2"):
        evaluate_episodes(X, y, sample_episodes(y, g, 2, 1, 1, 1), "prototype")


def test_shots_curve_plot_is_a_png(tmp_path):
    X, y, g = make_features(separation=0.5)
    rows = shots_curve(X, y, g, shots_list=(1, 3), queries=4, episodes=10, classifiers=("prototype", "knn"))
    assert [(row["shots"], row["classifier"]) for row in rows] == [
        (1, "prototype"),
        (1, "knn"),
        (3, "prototype"),
        (3, "knn"),
    ]
    path = plot_shots_curve(rows, tmp_path / "plots" / "shots.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["shots.png"]
