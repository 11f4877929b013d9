"""Explanations: sanity checks on a synthetic task whose evidence sits at a known place, plus files and errors.

Task: 64x64 noisy images, each with three bright bars at random places; positives also hold a disc at a fixed
place. A tiny CNN learns it in a few epochs. A faithful explanation of the positive class puts most of its mass on
the disc; the same network with re-initialised weights (model-randomisation check) must not. The bars are brighter
and larger than the disc, so an explanation that merely follows brightness fails the check.
Measured over 5 training seeds: Grad-CAM share 0.70-0.94 trained vs 0.18-0.22 randomised; LIME 0.43-0.81 vs 0.18.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import keras
import numpy as np
import pytest
from keras import layers
from sklearn.linear_model import LogisticRegression

from tlfusion.backbones.registry import build_backbone, feature_model, gradcam_layer_name
from tlfusion.data.images import resize_pad
from tlfusion.errors import InputError
from tlfusion.explain import lime as lime_module
from tlfusion.explain.cases import explain_cases
from tlfusion.explain.decision import decision_head, selected_model_maps
from tlfusion.explain.gallery import REVIEW_COLUMNS, Case, write_gallery
from tlfusion.explain.gradcam import GradCAM, bundle_gradcam, default_layer_name
from tlfusion.explain.lime import explain_lime
from tlfusion.explain.overlay import crop_to_original, save_heatmap_overlay, save_lime_overlay
from tlfusion.features.fusion import FeatureFusion
from tlfusion.models.classifiers import fusion_pipeline

SIZE = 64
CENTRE = (20, 20)
RADIUS = 7
DISC_VALUE, BAR_VALUE, BARS = 180.0, 220.0, 3  # distractors brighter and larger in total than the evidence
ROWS, COLUMNS = np.mgrid[:SIZE, :SIZE]
DISTANCE = np.hypot(ROWS - CENTRE[0], COLUMNS - CENTRE[1])
BLOB_AREA = DISTANCE <= 2 * RADIUS  # the disc and its immediate surroundings (a coarse map cannot be sharper)


def blob_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images [count, 64, 64, 1] in [0, 255] and labels (1 = disc present), alternating."""
    rng = np.random.default_rng(seed)
    images = rng.normal(60, 10, (count, SIZE, SIZE)).astype(np.float32)
    labels = np.arange(count) % 2
    for image, label in zip(images, labels, strict=True):
        for _ in range(BARS):
            image[_random_bar(rng)] = BAR_VALUE
        if label:
            image[DISTANCE <= RADIUS] = DISC_VALUE
    return np.clip(images, 0, 255)[..., None], labels


def _random_bar(rng: np.random.Generator) -> np.ndarray:
    """A 2x28 bar, horizontal or vertical, that keeps clear of the disc area."""
    while True:
        across, along = rng.integers(4, 60), rng.integers(2, 34)
        bar = np.zeros((SIZE, SIZE), bool)
        if rng.random() < 0.5:
            bar[across - 1 : across + 1, along : along + 28] = True
        else:
            bar[along : along + 28, across - 1 : across + 1] = True
        if not (bar & (DISTANCE <= RADIUS + 6)).any():
            return bar


def tiny_cnn() -> keras.Model:
    """A flat model with tlfusion's landmarks: input `image`, a 16x16 last conv block, `features`, `head`."""
    image = keras.Input((SIZE, SIZE, 1), name="image")
    hidden = layers.Rescaling(1 / 255)(image)
    for block, filters in enumerate((8, 16, 16)):
        hidden = layers.Conv2D(filters, 3, padding="same", use_bias=False)(hidden)
        hidden = layers.BatchNormalization(momentum=0.8)(hidden)
        hidden = layers.ReLU(name=f"block{block}_relu")(hidden)
        if block < 2:
            hidden = layers.MaxPooling2D()(hidden)
    features = layers.GlobalAveragePooling2D(name="features")(hidden)
    return keras.Model(image, layers.Dense(1, name="head")(features), name="tiny_cnn")


def randomised(model: keras.Model, seed: int) -> keras.Model:
    """The same architecture with freshly initialised weights."""
    keras.utils.set_random_seed(seed)
    return keras.models.clone_model(model)


class FakeBundle:
    """The duck-typed bundle interface: backbones -> fused features -> an identity fusion and a real
    LogisticRegression (a linear classifier: its Grad-CAM of the selected model is exact)."""

    flip = False
    threshold = 0.5

    def __init__(self, models: dict[str, keras.Model], images: np.ndarray, labels: np.ndarray):
        self.models = models
        self.image_size = SIZE
        self.class_names = ["normal", "abnormal"]
        self.meta = {"model": "tiny/lr"}
        self._extractors = [feature_model(model) for model in models.values()]
        classifier = LogisticRegression(max_iter=2000)
        self.estimator = fusion_pipeline(FeatureFusion(standardize=False), classifier).fit(
            self.features(images), labels
        )

    @property
    def fusion(self) -> FeatureFusion:
        return self.estimator.named_steps["fusion"]

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(extractor.predict_on_batch(images)) for extractor in self._extractors], 1)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return self.estimator.predict_proba(self.features(images))


@pytest.fixture(scope="module")
def task():
    train, test = blob_images(128, seed=0), blob_images(16, seed=1)
    keras.utils.set_random_seed(0)
    model = tiny_cnn()
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(*train, epochs=10, batch_size=16, verbose=0)
    logits = model.predict_on_batch(test[0])[:, 0]
    assert logits[test[1] == 1].min() > logits[test[1] == 0].max(), "the tiny CNN did not learn the synthetic task"
    bundle = FakeBundle({"tiny": model}, train[0], train[1])
    return {"model": model, "bundle": bundle, "positives": test[0][test[1] == 1], "train": train, "test": test}


def blob_share(maps: np.ndarray) -> float:
    """Mean over maps of the fraction of positive mass inside the disc area."""
    positive = np.maximum(maps, 0)
    return float(np.mean(positive[:, BLOB_AREA].sum(1) / np.maximum(positive.sum((1, 2)), 1e-12)))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_gradcam_mass_on_evidence_and_not_after_randomisation(task, method):
    trained = blob_share(GradCAM(task["model"], method=method)(task["positives"], target=1))
    random = np.mean(
        [blob_share(GradCAM(randomised(task["model"], seed), method=method)(task["positives"])) for seed in range(3)]
    )
    assert trained > 0.6, trained
    assert random < 0.4, random
    print(f"{method}: blob share trained {trained:.2f}, randomised {random:.2f}")


def trained_and_randomised_shares(task, share, seeds: int) -> tuple[float, float]:
    """`share` of the trained bundle, and its mean over `seeds` randomised bundles (backbone re-initialised,
    classifier fitted to shuffled labels)."""
    images, labels = task["train"]
    shuffled = np.random.default_rng(0).permutation(labels)
    randomised_bundles = (
        FakeBundle({"tiny": randomised(task["model"], seed)}, images, shuffled) for seed in range(seeds)
    )
    return share(task["bundle"]), float(np.mean([share(bundle) for bundle in randomised_bundles]))


def test_selected_model_map_on_evidence_and_not_after_randomisation(task):
    """Grad-CAM of the selected model (backbone -> fusion -> logistic regression): on the disc for the trained
    bundle; not for bundles whose backbone is re-initialised and whose classifier learnt shuffled labels."""

    def share(bundle) -> float:
        return blob_share(selected_model_maps(bundle, task["positives"], decision_head(bundle.estimator, None, 0.5)))

    trained, random = trained_and_randomised_shares(task, share, seeds=3)
    assert trained > 0.6, trained
    assert random < 0.4, random
    print(f"selected model: blob share trained {trained:.2f}, randomised {random:.2f}")


def lime_disc_share(explanation) -> float:
    """Fraction of the positive superpixel weights carried by superpixels that overlap the disc."""
    weights = np.zeros(explanation.segments.max() + 1)
    weights[explanation.segments.ravel()] = np.maximum(explanation.weights.ravel(), 0)
    on_disc = np.unique(explanation.segments[DISTANCE <= RADIUS])
    return float(weights[on_disc].sum() / max(weights.sum(), 1e-12))


def test_lime_mass_on_evidence_and_not_after_randomisation(task):
    """Randomised bundle: backbone re-initialised, classifier fitted to shuffled labels."""
    positives = task["positives"][:3]

    def share(bundle) -> float:
        return np.mean([lime_disc_share(explain_lime(bundle, image, num_samples=300)) for image in positives])

    trained, random = trained_and_randomised_shares(task, share, seeds=4)
    assert trained > 0.5, trained
    assert random < 0.3, random
    print(f"LIME: disc share trained {trained:.2f}, randomised {random:.2f}")


def test_lime_is_reproducible_with_consistent_masks(task):
    image = task["positives"][0]
    first = explain_lime(task["bundle"], image, num_samples=100, seed=3, top_k=2)
    again = explain_lime(task["bundle"], image, num_samples=100, seed=3, top_k=2)
    np.testing.assert_array_equal(first.weights, again.weights)
    assert first.weights.shape == first.segments.shape == (SIZE, SIZE)
    assert 20 <= first.segments.max() + 1 <= 80
    assert not (first.positive_mask & first.negative_mask).any()
    assert len(np.unique(first.segments[first.positive_mask])) <= 2
    assert (first.weights[first.positive_mask] > 0).all() and (first.weights[first.negative_mask] < 0).all()


PADDING = 12  # the letterbox's black strips: columns [0, 12) and [52, 64)


class PaddingSensitiveModel:
    """A bundle stand-in whose abnormal probability rises with the brightness of the image's left padding strip and,
    less, of its centre: switching the black padding to grey (LIME's old fill) moves it most."""

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        padding, centre = images[:, :, :PADDING, 0].mean(axis=(1, 2)), images[:, 24:40, 24:40, 0].mean(axis=(1, 2))
        positive = 1 / (1 + np.exp(-(padding / 20 + centre / 60 - 2)))
        return np.stack([1 - positive, positive], axis=1)


@pytest.mark.parametrize("background_level", [lime_module.BACKGROUND_LEVEL, -1.0])
def test_lime_leaves_the_dark_padding_alone(monkeypatch, background_level):
    """The dark border-connected background is one segment that is never switched off, weighs 0 and is never
    outlined, so a model's reaction to grey padding is not credited to the border. Control (level -1: nothing
    counts as background): the padding then weighs more than the anatomy, so the check can fail."""
    monkeypatch.setattr(lime_module, "BACKGROUND_LEVEL", background_level)
    image = np.zeros((SIZE, SIZE, 1), np.float32)
    image[:, PADDING : SIZE - PADDING, 0] = np.random.default_rng(0).normal(120, 20, (SIZE, SIZE - 2 * PADDING))
    explanation = explain_lime(PaddingSensitiveModel(), image, num_samples=200, top_k=3)
    padding = np.ones((SIZE, SIZE), bool)
    padding[:, PADDING : SIZE - PADDING] = False
    outlined = explanation.positive_mask | explanation.negative_mask
    if background_level < 0:
        magnitude = np.abs(explanation.weights)
        assert not explanation.background.any() and magnitude[padding].mean() > magnitude[~padding].mean()
        return
    np.testing.assert_array_equal(explanation.background, padding)
    assert (explanation.weights[padding] == 0).all() and not (outlined & padding).any()
    assert explanation.positive_mask[24:40, 24:40].any()


def test_gradcam_batches_agree_and_maps_are_normalised(task):
    images = task["test"][0]
    explainer = GradCAM(task["model"])
    small, large = explainer(images, batch_size=3), explainer(images, batch_size=32)
    np.testing.assert_allclose(small, large, atol=1e-5)
    assert small.shape == (len(images), SIZE, SIZE) and small.dtype == np.float32
    assert small.min() >= 0 and np.allclose(small.max(axis=(1, 2)), 1.0)


def test_constant_images_and_zero_gradients_give_no_nan(task):
    constant = np.stack([np.zeros((SIZE, SIZE, 1)), np.full((SIZE, SIZE, 1), 128.0)]).astype(np.float32)
    for target in (0, 1):
        maps = GradCAM(task["model"])(constant, target=target)
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    silent = randomised(task["model"], 0)
    head = silent.get_layer("head")
    head.set_weights([np.zeros_like(weight) for weight in head.get_weights()])
    zero_maps = GradCAM(silent)(task["positives"][:2])
    np.testing.assert_array_equal(zero_maps, 0.0)


def test_negative_target_does_not_point_at_the_positive_evidence(task):
    """On abnormal images the disc argues against "normal": the negative-class map must leave it."""
    assert blob_share(GradCAM(task["model"])(task["positives"], target=0)) < 0.3


def test_real_backbone_layer_and_bundle_maps(task):
    keras.utils.set_random_seed(0)
    mobilenet = build_backbone("mobilenetv2", SIZE, alpha=0.35)
    assert default_layer_name(mobilenet) == gradcam_layer_name(mobilenet)
    images = task["positives"][:2]
    bundle = FakeBundle({"tiny": task["model"], "mobilenetv2": mobilenet}, task["test"][0], task["test"][1])
    maps = bundle_gradcam(bundle, images, target="abnormal")
    assert list(maps) == ["tiny", "mobilenetv2", "mean"]
    assert all(values.shape == (2, SIZE, SIZE) and np.isfinite(values).all() for values in maps.values())
    np.testing.assert_allclose(maps["mean"], (maps["tiny"] + maps["mobilenetv2"]) / 2, atol=1e-6)
    np.testing.assert_allclose(maps["tiny"], bundle_gradcam(bundle, images, target=1)["tiny"], atol=1e-6)


def test_gradcam_input_errors(task):
    model = task["model"]
    with pytest.raises(InputError, match="unknown class 'fracture'"):
        bundle_gradcam(task["bundle"], task["positives"][:1], target="fracture")
    with pytest.raises(InputError, match="no layer 'conv_missing'"):
        GradCAM(model, layer_name="conv_missing")
    with pytest.raises(InputError, match="not 4-D"):
        GradCAM(model, layer_name="features")
    with pytest.raises(InputError, match="out of range"):
        GradCAM(model)(task["positives"][:1], target=2)
    with pytest.raises(InputError, match="do not fit"):
        GradCAM(model)(np.zeros((1, 32, 32, 1), np.float32))
    with pytest.raises(InputError, match="unknown Grad-CAM method"):
        GradCAM(model, method="saliency")
    flat_input = keras.Input((SIZE, SIZE, 1), name="image")
    dense_only = keras.Model(flat_input, layers.Dense(1, name="head")(layers.Flatten()(flat_input)))
    with pytest.raises(InputError, match="no 4-D"):
        GradCAM(dense_only)


def test_crop_to_original_undoes_the_letterbox():
    rng = np.random.default_rng(0)
    for shape in [(30, 60), (70, 35), (50, 50)]:
        pattern = cv2.GaussianBlur(rng.uniform(0, 1, shape).astype(np.float32), (0, 0), 3)
        recovered = crop_to_original(resize_pad(pattern, 64), shape)
        assert recovered.shape == shape
        assert np.corrcoef(recovered.ravel(), pattern.ravel())[0, 1] > 0.95


def test_overlays_are_written_atomically(task, tmp_path):
    original = np.full((40, 80), 100, np.float32)
    heatmap = np.zeros((SIZE, SIZE), np.float32)
    heatmap[20:30, 10:20] = 1
    heat = save_heatmap_overlay(original, heatmap, tmp_path / "heat.png", "Grad-CAM")
    lime = save_lime_overlay(
        original, explain_lime(task["bundle"], resize_pad(original, SIZE)[..., None], 20), tmp_path / "lime.png"
    )
    for path in (heat, lime):
        picture = cv2.imread(str(path))
        assert picture is not None and picture.shape[1] > picture.shape[0]  # wide original stays wide
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.png", "lime.png"]


def write_pngs(folder, images: np.ndarray, shape: tuple[int, int] = (SIZE, SIZE)) -> list[str]:
    """Save images as PNG files of `shape` (a non-square one is letterboxed back by the loader)."""
    folder.mkdir()
    paths = []
    for index, image in enumerate(images):
        path = folder / f"case {index}.png"
        cv2.imwrite(str(path), cv2.resize(image[..., 0], shape[::-1]).astype(np.uint8))
        paths.append(str(path))
    return paths


def test_explain_cases_writes_a_linked_gallery_and_review_sheet(task, tmp_path):
    images, labels = task["test"][0][:4], task["test"][1][:4].tolist()
    paths = write_pngs(tmp_path / "images", images)
    labels[0] = 1 - labels[0]  # a deliberate mistake: must be listed first
    out_dir = tmp_path / "explanations"
    index = explain_cases(task["bundle"], paths, labels, out_dir, lime_samples=30)
    page = index.read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    # image, Grad-CAM of the selected model, of the backbone's own head, LIME
    assert len(re.findall(r"<img ", page)) == 4 * 4
    assert links and all(not os.path.isabs(link) and (out_dir / link).is_file() for link in links)
    assert "http" not in page
    with open(out_dir / "review.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == REVIEW_COLUMNS
    assert rows[0]["case_id"].startswith("000_") and rows[0]["correct"] == "False"
    assert all(row["correct"] == "True" for row in rows[1:])
    assert all(row["reviewer_verdict"] == row["reviewer_notes"] == "" for row in rows)
    assert [row["case_id"] for row in rows] == re.findall(r'<tr class="\w+" data-order="\d+"[^>]*><td>([^<]+)', page)


def test_gallery_order_and_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    cases = [
        Case("tn_sure", "x", 0.05, 0, {"image": "a.png"}),
        Case("fp_sure", "x", 0.95, 0, {"image": "a.png"}),
        Case("tp_borderline", "x", 0.55, 1, {"image": "a.png"}),
        Case("fn_borderline", "x", 0.45, 1, {"image": "a.png"}),
    ]
    write_gallery(cases, tmp_path)
    with open(tmp_path / "review.csv", newline="") as handle:
        order = [row["case_id"] for row in csv.DictReader(handle)]
    assert order == ["fp_sure", "fn_borderline", "tp_borderline", "tn_sure"]
    with pytest.raises(InputError, match="missing"):
        write_gallery([Case("c", "x", 0.5, 1, {"image": "absent.png"})], tmp_path)


def test_explain_cases_input_errors(task, tmp_path):
    paths = write_pngs(tmp_path / "images", task["positives"][:1])
    with pytest.raises(InputError, match="unknown method"):
        explain_cases(task["bundle"], paths, [1], tmp_path / "out", methods=("occlusion",))
    with pytest.raises(InputError, match="1 images"):
        explain_cases(task["bundle"], paths, [1, 0], tmp_path / "out")
    with pytest.raises(InputError, match="unknown class"):
        explain_cases(task["bundle"], paths, ["fracture"], tmp_path / "out")


PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var drawn = images.filter(function (image) { return image.complete && image.naturalWidth > 0; }).length;
  document.querySelector('th[data-key="confidence"]').click();
  var rows = Array.from(document.querySelectorAll("#cases tbody tr"));
  var order = rows.map(function (row) { return row.dataset.confidence; });
  var marker = document.createElement("div");
  marker.id = "probe";
  marker.textContent = "drawn " + drawn + " of " + images.length + " order " + order.join(",");
  document.body.appendChild(marker);
});
</script></body>"""


@pytest.mark.slow
def test_gallery_renders_in_headless_chromium(task, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    paths = write_pngs(tmp_path / "images", task["test"][0][:3], shape=(48, 64))
    index = explain_cases(task["bundle"], paths, task["test"][1][:3], tmp_path / "gallery", lime_samples=30)
    probe = index.with_name("probe.html")
    probe.write_text(index.read_text().replace("</body>", PROBE))
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<div id="probe">drawn (\d+) of (\d+) order ([\d.,]+)</div>', dom)
    assert found, dom[-500:]
    assert int(found[1]) == int(found[2]) == 3 * 4
    confidences = [float(value) for value in found[3].split(",")]
    assert confidences == sorted(confidences)
    screenshot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={screenshot}", index.as_uri()], capture_output=True, timeout=120)
    picture = cv2.imread(str(screenshot), cv2.IMREAD_GRAYSCALE)
    assert picture is not None and picture.shape == (1000, 1400) and picture.std() > 10
