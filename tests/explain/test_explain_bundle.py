"""Grad-CAM and LIME through a bundle the pipeline wrote: a tiny experiment run end to end with explanations on,
then its saved bundle reloaded and explained again, against the run's own outputs and a closed-form Grad-CAM."""

from __future__ import annotations

import html
import re
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import write_folder_dataset
from tlfusion.backbones.registry import FEATURES_LAYER, HEAD_LAYER, gradcam_layer_name
from tlfusion.bundle.folder import load_bundle
from tlfusion.cli import main
from tlfusion.data.images import load_batch
from tlfusion.explain.gradcam import bundle_gradcam
from tlfusion.explain.lime import explain_lime

SIZE = 64  # the last convolution is 2x2: a Grad-CAM map that can vary over the image


@pytest.fixture(scope="module")
def explained_run(tmp_path_factory) -> Path:
    """A finished run (one tiny MobileNetV2 with random weights, logistic regression) with 2 explained test cases."""
    folder = tmp_path_factory.mktemp("explain_bundle")
    experiment = {
        "name": "tiny_explain",
        "positive_class": "abnormal",
        "data": {"format": "folder", "root": str(write_folder_dataset(folder / "data"))},
        "split": {"test_fraction": 0.25, "val_fraction": 0.25},
        "image": {"size": SIZE},
        "backbones": [{"name": "mobilenetv2", "options": {"alpha": 0.35}}],
        "finetune": {"enabled": False},  # fine-tuning has its own tests; the head stays at its random start
        "features": {"engine": "keras"},
        "classifiers": {"models": ["lr"], "cv": 2},
        "evaluate": {"bootstrap": 20},
        "explain": {"cases": 2, "lime_samples": 20},
    }
    (folder / "tiny.yaml").write_text(yaml.safe_dump(experiment))
    assert main(["run", str(folder / "tiny.yaml"), "--out", str(folder / "run")]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def bundle(explained_run):
    return load_bundle(explained_run / "bundle")


def explained_cases(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "explanations" / "review.csv")


def test_explained_probabilities_are_the_bundles_and_the_runs(explained_run, bundle):
    """The probability shown for each explained case is what the saved bundle predicts for that file and what the
    fit stage stored for it."""
    cases = explained_cases(explained_run)
    assert len(cases) == 2
    images = load_batch(list(cases["path"]), bundle.image_size, bundle.clahe)
    predicted = np.asarray(bundle.predict_proba(images))[:, 1]
    np.testing.assert_allclose(cases["probability"], predicted, rtol=0, atol=1e-6)  # review.csv keeps 6 decimals
    stored = pd.read_csv(explained_run / "fit" / "predictions.csv")
    stored = stored[(stored["model"] == "mobilenetv2/lr") & (stored["split"] == "test")].set_index("path")["prob"]
    np.testing.assert_allclose(stored[cases["path"]].to_numpy(), predicted, rtol=0, atol=1e-5)
    for case_id in cases["case_id"]:
        for suffix in ("", "_gradcam_0", "_gradcam_1", "_lime"):
            png = explained_run / "explanations" / f"{case_id}{suffix}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_gradcam_of_the_saved_backbone_is_the_closed_form(explained_run, bundle):
    """Behind global average pooling, (inference-time no-op) dropout and a linear head, the mean gradient of the
    logit over the last convolution's channel c is head_kernel[c] / (h * w): Grad-CAM is ReLU(A @ kernel) resized
    and divided by its maximum. The reloaded bundle's maps must equal that, be finite and differ across images."""
    model = bundle.models["mobilenetv2"]
    images = load_batch(list(explained_cases(explained_run)["path"]), bundle.image_size, bundle.clahe)
    maps = bundle_gradcam(bundle, images)
    assert set(maps) == {"mobilenetv2", "mean"}
    cams = maps["mobilenetv2"]
    assert cams.shape == (2, SIZE, SIZE) and np.isfinite(cams).all()
    layer = gradcam_layer_name(model)
    activations = keras.Model(model.input, model.get_layer(layer).output)(images).numpy()
    assert model.get_layer(FEATURES_LAYER).input.name == model.get_layer(layer).output.name
    kernel = model.get_layer(HEAD_LAYER).get_weights()[0][:, 0]
    expected = []
    for raw in np.maximum(activations @ kernel, 0):
        resized = cv2.resize(raw, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        expected.append(resized / resized.max())
    np.testing.assert_allclose(cams, np.stack(expected), atol=1e-5)
    assert np.allclose(cams.max(axis=(1, 2)), 1.0) and (cams.min(axis=(1, 2)) < 0.9).all()
    assert not np.allclose(cams[0], cams[1], atol=1e-3)


def test_lime_through_the_bundle_predicts_what_hiding_superpixels_does(explained_run, bundle):
    """LIME's weights are a linear model of the bundle's positive probability in which superpixels are on or off
    (off: filled with the image mean; the background segment is never off). Hiding random halves of the anatomy's
    superpixels must change the bundle's probability as the weights on those pixels say: fails for flipped signs or
    weights painted on the wrong superpixels. The image is the run's least saturated test image (probability
    nearest 0.5): near 0 or 1 the probability flattens, and a linear model of it, LIME's, fits less well (0.6 on
    this run's true negative at p = 0.03)."""
    stored = pd.read_csv(explained_run / "fit" / "predictions.csv")
    test = stored[(stored["model"] == "mobilenetv2/lr") & (stored["split"] == "test")]
    borderline = test.loc[(test["prob"] - 0.5).abs().idxmin(), "path"]
    image = load_batch([borderline], bundle.image_size, bundle.clahe)[0]
    explanation = explain_lime(bundle, image, num_samples=150, seed=0)
    assert explanation.weights.shape == (SIZE, SIZE) and np.isfinite(explanation.weights).all()
    assert explanation.weights.max() > 0 > explanation.weights.min()
    segments = explanation.segments
    weight_of = np.zeros(segments.max() + 1)
    weight_of[segments.ravel()] = explanation.weights.ravel()
    hidden = np.random.default_rng(1).random((20, len(weight_of))) < 0.5
    hidden[:, np.unique(segments[explanation.background])] = False  # LIME never hides the background
    changed = np.stack([np.where(off[segments][..., None], image.mean(), image) for off in hidden]).astype(np.float32)
    probabilities = np.asarray(bundle.predict_proba(np.concatenate([image[None], changed])))[:, 1]
    actual, predicted = probabilities[1:] - probabilities[0], -(hidden * weight_of).sum(axis=1)
    assert np.corrcoef(actual, predicted)[0, 1] > 0.8  # 0.999 here


def test_gallery_leads_with_the_selected_models_exact_map(explained_run):
    """The run selected mobilenetv2/lr (linear): the first map is its exact Grad-CAM, the backbone's own head
    comes after, labelled as not the selected model; the cases come from two different outcomes."""
    page = html.unescape((explained_run / "explanations" / "index.html").read_text())
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", page)
    assert headers[1:5] == [
        "radiograph",
        "Grad-CAM of the selected model mobilenetv2/lr (exact)",
        "Grad-CAM of backbone mobilenetv2's own head (not the selected model)",
        "LIME of the selected model: green for abnormal, red against",
    ]
    assert "Explanations for review: mobilenetv2/lr" in page
    outcomes = re.findall(r"(?:correct|incorrect) ([TF][PN])</td>", page)
    assert len(outcomes) == 2 and len(set(outcomes)) == 2, outcomes


def test_explain_command_takes_the_experiments_cases_and_lime_samples(explained_run, monkeypatch, tmp_path):
    """`tlfusion explain` without --cases / --lime-samples explains the experiment's explain.cases (2, not the
    default 8) with its explain.lime_samples (20)."""
    import tlfusion.explain.cases as explain

    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs["num_samples"])
        return explain_lime(*args, **kwargs)

    monkeypatch.setattr(explain, "explain_lime", recording)
    experiment = str(explained_run.parent / "tiny.yaml")
    out = tmp_path / "gallery"
    assert main(["explain", str(explained_run / "bundle"), "--data", experiment, "--out", str(out)]) == 0
    assert calls == [20, 20]
    assert (
        main(
            [
                "explain",
                str(explained_run / "bundle"),
                "--data",
                experiment,
                "--cases",
                "1",
                "--lime-samples",
                "12",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert calls == [20, 20, 12]
