"""A bundle saved by the code before the package layout moved (tests/fixtures/bundle_before_layout) still loads, is
trusted, and predicts what it predicted then."""

from pathlib import Path

import numpy as np
import pandas as pd
import skops.io

from tlfusion.bundle.folder import load_bundle

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "bundle_before_layout"


def test_the_fusion_file_names_the_old_class_path():
    assert skops.io.get_untrusted_types(file=DATA / "bundle" / "fusion.skops") == ["tlfusion.features.FeatureFusion"]


def test_an_old_bundle_predicts_as_it_did_when_saved():
    expected = pd.read_csv(DATA / "expected.csv")
    bundle = load_bundle(DATA / "bundle")
    prob, ood = bundle.assess_paths([DATA / "inputs" / name for name in expected["image"]])
    np.testing.assert_allclose(prob, expected[["p_normal", "p_abnormal"]].to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ood, expected["ood"].to_numpy(), rtol=1e-4, atol=1e-9)
    assert type(bundle.fusion).__name__ == "FeatureFusion" and bundle.trust.startswith("integrity only")
