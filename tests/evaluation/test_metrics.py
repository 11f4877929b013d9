import time

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

from tlfusion.errors import InputError
from tlfusion.evaluation import metrics as metrics_module
from tlfusion.evaluation.metrics import (
    aggregate_by_study,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    paired_bootstrap_delta,
)
from tlfusion.evaluation.multilabel_metrics import bootstrap_mean_auroc_ci, multilabel_auroc

# 4 positives, 6 negatives; at 0.5: tp=3, fn=1, fp=1, tn=5
Y_HAND = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P_HAND = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.4, 0.2, 0.1, 0.1, 0.05])


def noisy_scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.round(np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1), 2)


def test_binary_metrics_match_hand_computed_values():
    result = binary_metrics(Y_HAND, P_HAND)
    assert result["n"] == 10
    assert result["confusion"] == [[5, 1], [1, 3]]
    assert result["accuracy"] == pytest.approx(0.8)
    assert result["f1"] == pytest.approx(0.75)  # 2*3 / (6 + 1 + 1)
    assert result["sensitivity"] == pytest.approx(0.75)
    assert result["specificity"] == pytest.approx(5 / 6)
    assert result["kappa"] == pytest.approx((0.8 - 0.52) / 0.48)  # p_e = (4*4 + 6*6) / 100
    assert result["auroc"] == pytest.approx(22 / 24)  # 3 positives beat all 6 negatives, 0.3 beats 4
    assert all(type(result[key]) is float for key in ("accuracy", "f1", "kappa", "auroc"))


def test_binary_metrics_ties_count_half_and_threshold_is_inclusive():
    result = binary_metrics([1, 0], [0.4, 0.4], threshold=0.4)
    assert result["auroc"] == pytest.approx(0.5)
    assert result["confusion"] == [[0, 1], [0, 1]]


def test_binary_metrics_agree_with_sklearn():
    y, p = noisy_scores(300)
    result = binary_metrics(y, p, threshold=0.45)
    assert result["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert result["kappa"] == pytest.approx(cohen_kappa_score(y, p >= 0.45))
    assert result["f1"] == pytest.approx(f1_score(y, p >= 0.45))


def test_binary_metrics_undefined_values_are_none():
    result = binary_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert result["auroc"] is None
    assert result["specificity"] is None
    assert result["sensitivity"] == pytest.approx(2 / 3)
    assert result["confusion"] == [[0, 0], [1, 2]]


@pytest.mark.parametrize(
    ("y_true", "prob", "message"),
    [
        ([0, 1, 1], [0.1, np.nan, 0.3], "NaN or inf"),
        ([0, 1, 1], [0.1, np.inf, 0.3], "NaN or inf"),
        ([0, 1], [0.1, 0.2, 0.3], "3 values|shape"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "only 0 and 1"),
        ([0, 1, 1], [0.1, 1.2, 0.3], r"\[0, 1\]"),
        ([], [], "empty"),
    ],
)
def test_bad_inputs_raise_input_error(y_true, prob, message):
    for call in (binary_metrics, choose_threshold):
        with pytest.raises(InputError, match=message):
            call(y_true, prob)
    with pytest.raises(InputError, match=message):
        bootstrap_ci(y_true, prob, groups=None)
    with pytest.raises(InputError, match=message):
        aggregate_by_study(np.arange(len(y_true)), y_true, prob)


def test_bootstrap_ci_contains_point_estimate_and_is_seeded():
    y, p = noisy_scores(400)
    groups = np.arange(400) // 4
    point = binary_metrics(y, p)
    ci = bootstrap_ci(y, p, groups, n_boot=500, seed=3)
    for metric, (low, high) in ci.items():
        assert low < point[metric] < high, metric
    assert bootstrap_ci(y, p, groups, n_boot=500, seed=3) == ci
    assert bootstrap_ci(y, p, groups, n_boot=500, seed=4) != ci


def test_paired_delta_separates_a_better_model_and_not_itself():
    y, weak = noisy_scores(400)
    strong = np.clip(0.4 * y + 0.6 * weak, 0, 1)  # the same noise, a larger label signal
    groups = np.arange(400) // 4
    better = paired_bootstrap_delta(y, strong, weak, groups, n_boot=500)
    observed = binary_metrics(y, strong)["auroc"] - binary_metrics(y, weak)["auroc"]
    assert better["auroc"]["delta"] == pytest.approx(observed)
    low, high = better["auroc"]["ci"]
    assert 0 < low < better["auroc"]["delta"] < high
    same = paired_bootstrap_delta(y, weak, weak, groups, n_boot=200)
    assert same["kappa"] == {"delta": 0.0, "ci": [0.0, 0.0]}  # paired: identical models never differ
    unpaired = bootstrap_ci(y, weak, groups, n_boot=500)["auroc"]
    assert high - low < unpaired[1] - unpaired[0]  # pairing removes the variance the two models share


def test_paired_delta_refuses_scores_of_different_lengths():
    y, p = noisy_scores(10)
    with pytest.raises(InputError, match="9"):
        paired_bootstrap_delta(y, p, p[:9], None)


def test_bootstrap_resamples_groups_not_images():
    y, p = noisy_scores(120, seed=1)
    patients = np.arange(120)
    copies = 5
    y_dup, p_dup, patients_dup = (np.repeat(a, copies) for a in (y, p, patients))
    by_patient = bootstrap_ci(y, p, patients, n_boot=400)
    duplicated_by_patient = bootstrap_ci(y_dup, p_dup, patients_dup, n_boot=400)
    duplicated_by_image = bootstrap_ci(y_dup, p_dup, None, n_boot=400)
    width = {name: ci[1] - ci[0] for name, ci in by_patient.items()}
    for metric in by_patient:
        # copies of a patient's images carry no new information: the patient-level CI does not move
        np.testing.assert_allclose(duplicated_by_patient[metric], by_patient[metric])
        # resampling images would pretend they are independent and shrink the CI by about sqrt(5)
        image_width = duplicated_by_image[metric][1] - duplicated_by_image[metric][0]
        assert image_width < 0.7 * width[metric], metric


def test_bootstrap_ci_single_group_collapses_to_point_and_single_class_auroc_is_none():
    y, p = noisy_scores(50)
    point = binary_metrics(y, p)
    ci = bootstrap_ci(y, p, np.zeros(50), n_boot=20)
    for metric, interval in ci.items():
        assert interval == pytest.approx([point[metric], point[metric]])
    assert bootstrap_ci(np.ones(50), p, None, n_boot=20)["auroc"] is None


@pytest.mark.slow  # a wall-clock bound: meaningful only on an idle machine, so not in the default suite
def test_bootstrap_ci_is_fast_enough():
    y, p = noisy_scores(500)
    start = time.perf_counter()
    bootstrap_ci(y, p, np.arange(500) // 2, n_boot=1000)
    assert time.perf_counter() - start < 3.0


def test_bootstrap_ci_rejects_bad_groups_and_settings():
    y, p = noisy_scores(10)
    with pytest.raises(InputError, match="groups"):
        bootstrap_ci(y, p, np.arange(9))
    with pytest.raises(InputError, match="missing"):
        bootstrap_ci(y, p, np.r_[np.arange(9.0), np.nan])
    with pytest.raises(InputError, match="level"):
        bootstrap_ci(y, p, None, level=95)
    with pytest.raises(InputError, match="n_boot"):
        bootstrap_ci(y, p, None, n_boot=0)


def test_aggregate_by_study_mean_and_max():
    studies = ["b", "a", "b", "a", "c"]
    y = [1, 0, 1, 0, 1]
    p = [0.2, 0.1, 0.8, 0.3, 0.6]
    ids, labels, prob = aggregate_by_study(studies, y, p, how="mean")
    assert ids.tolist() == ["a", "b", "c"]
    assert labels.tolist() == [0, 1, 1]
    np.testing.assert_allclose(prob, [0.2, 0.5, 0.6])
    _, _, prob_max = aggregate_by_study(studies, y, p, how="max")
    np.testing.assert_allclose(prob_max, [0.3, 0.8, 0.6])


def test_aggregate_by_study_rejects_mixed_labels_and_unknown_how():
    with pytest.raises(InputError, match="mixed labels.*'s1'"):
        aggregate_by_study(["s1", "s1", "s2"], [0, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="median"):
        aggregate_by_study(["s1", "s2"], [0, 1], [0.1, 0.2], how="median")


@pytest.mark.parametrize("criterion", ["kappa", "youden", "f1"])
def test_choose_threshold_separates_separable_scores(criterion):
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.2, 0.6, 0.9], criterion) == pytest.approx(0.4)


def test_choose_threshold_maximises_kappa_over_all_cuts():
    y, p = noisy_scores(200, seed=2)
    chosen = choose_threshold(y, p, "kappa")
    best_by_brute_force = max(cohen_kappa_score(y, p >= t) for t in np.unique(p))
    assert cohen_kappa_score(y, p >= chosen) == pytest.approx(best_by_brute_force)


def test_choose_threshold_rejects_unknown_criterion_and_single_class():
    with pytest.raises(InputError, match="criterion"):
        choose_threshold([0, 1], [0.2, 0.8], "auroc")
    with pytest.raises(InputError, match="both classes"):
        choose_threshold([1, 1], [0.2, 0.8])


def test_multilabel_auroc_per_finding_and_mean():
    rng = np.random.default_rng(0)
    Y = rng.integers(0, 2, (60, 3))
    Y[:, 2] = 0  # one finding absent: AUROC undefined
    scores = Y + rng.normal(0, 1.0, Y.shape)
    result = multilabel_auroc(Y, scores, ["effusion", "nodule", "hernia"])
    assert result["effusion"] == pytest.approx(roc_auc_score(Y[:, 0], scores[:, 0]))
    assert result["nodule"] == pytest.approx(roc_auc_score(Y[:, 1], scores[:, 1]))
    assert result["hernia"] is None
    assert result["mean"] == pytest.approx((result["effusion"] + result["nodule"]) / 2)


def test_multilabel_auroc_rejects_bad_shapes_and_names():
    Y = np.zeros((4, 2), dtype=int)
    with pytest.raises(InputError, match="same shape"):
        multilabel_auroc(Y, np.zeros((4, 3)), ["a", "b"])
    with pytest.raises(InputError, match="names"):
        multilabel_auroc(Y, np.zeros((4, 2)), ["a"])
    with pytest.raises(InputError, match="NaN"):
        multilabel_auroc(Y, np.full((4, 2), np.nan), ["a", "b"])


def test_mean_auroc_interval_resamples_patients_with_the_shared_bootstrap():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(30), 2)
    Y = rng.integers(0, 2, (60, 3))
    scores = Y + rng.normal(size=(60, 3))
    ci = bootstrap_mean_auroc_ci(Y, scores, patients, n_boot=200, seed=1)
    draws, item_group = metrics_module.group_resamples(60, patients, 200, 1)  # the resamples bootstrap_ci draws
    means = []
    for counts in draws:  # each resample as repeated rows, scored by the plain multi-label AUROC
        rows = np.repeat(np.arange(60), counts[item_group])
        means.append(multilabel_auroc(Y[rows], scores[rows], ["a", "b", "c"])["mean"])
    assert ci == pytest.approx(np.quantile(means, [0.025, 0.975]).tolist())
    assert ci[0] < multilabel_auroc(Y, scores, ["a", "b", "c"])["mean"] < ci[1]
    assert bootstrap_mean_auroc_ci(Y, scores, patients, n_boot=0) is None
