"""Calibration: Brier, ECE and reliability bins against hand-computed values, recalibration, and its bundle file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.bundle.test_bundle_folder import make_bundle, make_lr, parts  # noqa: F401 (fixture)
from tlfusion.bundle.folder import load_bundle, save_bundle
from tlfusion.errors import InputError
from tlfusion.evaluation.calibration import (
    Calibrator,
    calibrated_model,
    calibration_metrics,
    calibration_summary,
    fit_calibrator,
    load_calibrator,
    reliability_bins,
)

# bins [0.1, 0.2) holds 0.12, 0.15, 0.18 (2 of 3 positive); 0.85 and 0.95 are alone in theirs
Y = np.array([0, 1, 1, 0, 1])
P = np.array([0.12, 0.15, 0.18, 0.85, 0.95])


def test_binary_brier_and_ece_by_hand():
    brier = (0.12**2 + 0.85**2 + 0.82**2 + 0.85**2 + 0.05**2) / 5
    ece = (3 * abs(2 / 3 - 0.15) + 0.85 + 0.05) / 5  # count-weighted gap per bin
    assert calibration_metrics(Y, P) == pytest.approx({"brier": brier, "ece": ece})
    bins = reliability_bins(Y, P)
    assert [(b["low"], b["high"], b["n"]) for b in bins] == [(0.1, 0.2, 3), (0.8, 0.9, 1), (0.9, 1.0, 1)]
    assert bins[0]["mean_prob"] == pytest.approx(0.15) and bins[0]["observed"] == pytest.approx(2 / 3)


def test_bin_edges_lower_closed_and_one_in_the_last_bin():
    bins = reliability_bins([0, 1, 1], [0.1, 0.0999, 1.0])
    assert [(b["low"], b["n"]) for b in bins] == [(0.0, 1), (0.1, 1), (0.9, 1)]


def test_k_class_brier_and_top_label_ece_by_hand():
    prob = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    y = np.array([0, 2, 2])
    brier = (0.3**2 + 0.2**2 + 0.1**2 + 0.2**2 + 0.5**2 + 0.7**2 + 0.1**2 + 0.1**2 + 0.2**2) / 3
    ece = (0.3 + 0.5 + 0.2) / 3  # confidences 0.7 (right), 0.5 (wrong), 0.8 (right), one per bin
    assert calibration_metrics(y, prob) == pytest.approx({"brier": brier, "ece": ece})
    two = np.column_stack([1 - P, P])
    assert calibration_metrics(Y, two)["brier"] == pytest.approx(2 * calibration_metrics(Y, P)["brier"])


def test_intervals_resample_patients():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200)
    y = (rng.uniform(size=200) < p).astype(int)
    summary = calibration_summary(y, p, np.arange(200) // 2, n_boot=200, seed=0)
    for name in ("brier", "ece"):
        low, high = summary["ci"][name]
        assert low < summary[name] < high
    one_patient = calibration_summary(Y, P, ["a"] * 5, n_boot=50, seed=0)  # every resample is the whole set
    assert one_patient["ci"]["brier"] == pytest.approx([one_patient["brier"]] * 2)
    assert calibration_summary(Y, P, None, n_boot=0)["ci"] == {}


def test_sigmoid_apply_by_hand_and_fit_recovers_a_known_distortion():
    doubled = Calibrator("sigmoid", ((np.array([2.0]), np.array([0.0])),))
    assert doubled.apply(np.array([0.5, 0.75])) == pytest.approx([0.5, 0.9])  # logit 0.75 = ln 3; 3^2 / (1 + 3^2)
    rng = np.random.default_rng(1)
    p = rng.uniform(0.02, 0.98, 20000)
    truth = 1 / (1 + np.exp(-(2 * np.log(p / (1 - p)) + 0.5)))
    y = (rng.uniform(size=p.size) < truth).astype(int)
    ((a, b),) = fit_calibrator("sigmoid", y, p).columns
    assert a[0] == pytest.approx(2, abs=0.1) and b[0] == pytest.approx(0.5, abs=0.1)


def test_isotonic_by_hand():
    fitted = fit_calibrator("isotonic", [0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4])  # pooled: 0, 0.5, 0.5, 1
    assert fitted.apply(np.array([0.05, 0.1, 0.15, 0.25, 0.35, 0.9])) == pytest.approx([0, 0, 0.25, 0.5, 0.75, 1])


def test_recalibration_lowers_the_ece_of_overconfident_probabilities():
    rng = np.random.default_rng(2)
    truth = rng.uniform(0.2, 0.8, 4000)
    y = (rng.uniform(size=truth.size) < truth).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * np.log(truth / (1 - truth))))
    fit, test = slice(0, 2000), slice(2000, None)
    before = calibration_metrics(y[test], overconfident[test])["ece"]
    for method in ("sigmoid", "isotonic"):
        calibrator = fit_calibrator(method, y[fit], overconfident[fit])
        assert calibration_metrics(y[test], calibrator.apply(overconfident[test]))["ece"] < before / 2


def test_k_class_recalibration_keeps_rows_summing_to_one():
    rng = np.random.default_rng(3)
    prob = rng.dirichlet([1, 1, 1], 300)
    y = np.array([rng.choice(3, p=row) for row in prob])
    calibrated = fit_calibrator("isotonic", y, prob).apply(prob)
    assert calibrated.shape == (300, 3) and np.allclose(calibrated.sum(axis=1), 1)


def test_one_class_and_unknown_method_are_refused():
    with pytest.raises(InputError, match="one class"):
        fit_calibrator("sigmoid", [1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(InputError, match="sigmoid, isotonic"):
        fit_calibrator("platt", Y, P)


def test_calibrator_file_round_trip_and_refusals(tmp_path):
    for method in ("sigmoid", "isotonic"):
        calibrator = fit_calibrator(method, Y, P)
        calibrator.save(tmp_path / "c.npz")
        assert np.array_equal(load_calibrator(tmp_path / "c.npz").apply(P), calibrator.apply(P))
    np.savez(tmp_path / "objects.npz", method=np.array("sigmoid"), a0=np.array([object()]), b0=np.array([0.0]))
    np.savez(tmp_path / "falling.npz", method=np.array("isotonic"), a0=np.array([0.1, 0.5]), b0=np.array([0.9, 0.1]))
    for name in ("objects", "falling"):
        with pytest.raises(InputError, match=f"{name}.npz"):
            load_calibrator(tmp_path / f"{name}.npz")


def test_calibrated_model_fits_on_out_of_fold_rows_only():
    cv = pd.DataFrame({"model": "m", "split": "cv", "y_true": [0, 1, 0, 1], "prob": [0.1, 0.2, 0.3, 0.4]})
    test = pd.DataFrame({"model": "m", "split": "test", "y_true": [1, 1, 0, 0], "prob": [0.1, 0.2, 0.3, 0.4]})
    calibrator, threshold = calibrated_model(pd.concat([cv, test]), "m", "isotonic")
    assert calibrator.apply(np.array([0.15])) == pytest.approx([0.25]) and 0 < threshold <= 1


def test_bundle_carries_its_calibration(parts, tmp_path):  # noqa: F811 (fixture)
    _, _, Z, labels, images = parts
    plain = make_bundle(parts, make_lr())
    calibrator = fit_calibrator("sigmoid", labels, plain.classifier.predict_proba(Z)[:, 1])
    folder = save_bundle(make_bundle(parts, make_lr(), calibration=calibrator), tmp_path / "bundle")
    loaded = load_bundle(folder)
    expected = calibrator.apply(plain.predict_proba(images[:5]))
    np.testing.assert_allclose(loaded.predict_proba(images[:5]), expected, rtol=1e-5, atol=1e-6)
    assert "calibration.npz" in (folder / "manifest.json").read_text()
    np.savez(folder / "calibration.npz", method=np.array("isotonic"), a0=np.array([0.0]), b0=np.array([1.0]))
    with pytest.raises(InputError, match="calibration.npz: file was altered"):
        load_bundle(folder)
