"""Saved fusion models: round trip, integrity checks, safe formats, atomic writes."""

import json
import shutil

import cv2
import numpy as np
import pytest
import skops.io
from sklearn.ensemble import RandomForestClassifier, VotingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from xgboost import XGBClassifier

from tlfusion.backbones.registry import build_backbone, feature_model
from tlfusion.bundle import folder as bundle_module
from tlfusion.bundle.folder import load_bundle, save_bundle
from tlfusion.bundle.model import Bundle, check_class_names
from tlfusion.data.images import file_sha256, load_batch
from tlfusion.errors import InputError
from tlfusion.features.fusion import FeatureFusion, fuse
from tlfusion.features.onnx_graphs import onnx_graph
from tlfusion.models.classifiers import fusion_pipeline

SIZE = 32


class HomeMadeClassifier(LogisticRegression):
    """A class no bundle allow-list knows."""


def disk_full(*args):
    raise OSError("disk full")


def make_lr():
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))


def make_xgb():
    return XGBClassifier(n_estimators=8, max_depth=2, n_jobs=1, random_state=0)


def make_vote():
    members = [("lr", make_lr()), ("rf", RandomForestClassifier(n_estimators=5, random_state=0)), ("xgb", make_xgb())]
    return VotingClassifier(members, voting="soft")


@pytest.fixture(scope="module")
def parts():
    """One tiny backbone, training images, and fusion fitted on their features."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (24, SIZE, SIZE, 1)).astype(np.float32)
    images[::2] *= 0.3  # the negatives are darker, so classifiers have something to learn
    labels = np.tile([0, 1], 12)
    models = {"mobilenet_a": build_backbone("mobilenetv2", SIZE, alpha=0.35)}
    X, sizes = fuse([feature_model(model).predict(images, verbose=0) for model in models.values()])
    fusion = FeatureFusion(block_sizes=sizes, l2=True).fit(X)
    return models, fusion, fusion.transform(X), labels, images


def make_bundle(parts, classifier, labels=None, **changes) -> Bundle:
    """A bundle of the parts' backbone and fusion with `classifier` fitted on `labels` (default: the parts')."""
    models, fusion, Z, binary, _ = parts
    settings = {
        "models": models,
        "estimator": fusion_pipeline(fusion, classifier.fit(Z, binary if labels is None else labels)),
        "threshold": 0.4,
        "class_names": ["healthy", "fracture"],
        "image_size": SIZE,
        "meta": {"data": "synthetic"},
    }
    return Bundle(**{**settings, **changes})


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory):
    return save_bundle(make_bundle(parts, make_lr()), tmp_path_factory.mktemp("saved") / "bundle")


@pytest.fixture(scope="module")
def loaded(saved):
    return load_bundle(saved)


@pytest.fixture
def copy_of_saved(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "bundle")


@pytest.mark.parametrize("make_classifier", [make_lr, make_xgb, make_vote], ids=["lr", "xgb", "vote"])
def test_round_trip_gives_the_same_probabilities(parts, tmp_path, make_classifier):
    original = make_bundle(parts, make_classifier())
    _, _, Z, _, images = parts
    loaded = load_bundle(save_bundle(original, tmp_path / "bundle"))
    expected = original.classifier.predict_proba(Z[:6])
    np.testing.assert_allclose(loaded.predict_proba(images[:6]), expected, rtol=1e-5, atol=1e-6)  # [n, 2]
    assert (loaded.threshold, loaded.class_names, loaded.image_size, loaded.clahe, loaded.meta) == (
        0.4,
        ["healthy", "fracture"],
        SIZE,
        False,
        {"data": "synthetic"},
    )


def test_xgboost_is_stored_in_its_own_format_not_in_skops(parts, tmp_path):
    folder = save_bundle(make_bundle(parts, make_vote()), tmp_path / "bundle")
    assert sorted(path.name for path in (folder / "xgboost").iterdir()) == ["0.json", "1.json", "1.ubj"]
    assert not any("xgboost" in name for name in skops.io.get_untrusted_types(file=folder / "classifier.skops"))
    loaded = load_bundle(folder).classifier
    assert loaded.estimators_[2] is loaded.named_estimators_["xgb"]


def test_predict_paths_decodes_like_load_batch(loaded, tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        cv2.imwrite(paths[-1], np.random.default_rng(i).integers(0, 256, (40, 30), dtype=np.uint8))
    expected = loaded.predict_proba(load_batch(paths, SIZE))
    np.testing.assert_allclose(loaded.predict_paths(paths, batch_size=2), expected, rtol=1e-6, atol=1e-6)


def test_altered_file_is_refused(copy_of_saved):
    info = json.loads((copy_of_saved / "bundle.json").read_text())
    info["threshold"] = 0.01
    (copy_of_saved / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match=r"bundle\.json: file was altered"):
        load_bundle(copy_of_saved)


def test_missing_file_is_refused(copy_of_saved):
    (copy_of_saved / "fusion.skops").unlink()
    with pytest.raises(InputError, match=r"fusion\.skops: file listed in the manifest is missing"):
        load_bundle(copy_of_saved)


def test_extra_file_is_refused(copy_of_saved):
    (copy_of_saved / "backbones" / "sneaky.keras").write_bytes(b"")
    with pytest.raises(InputError, match=r"sneaky\.keras: file not listed"):
        load_bundle(copy_of_saved)


def test_folder_without_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(InputError, match="no manifest.json"):
        load_bundle(tmp_path)


def test_type_outside_the_allow_list_is_refused_on_save(parts, tmp_path):
    with pytest.raises(InputError, match="HomeMadeClassifier"):
        save_bundle(make_bundle(parts, HomeMadeClassifier()), tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_type_outside_the_allow_list_is_refused_on_load(parts, copy_of_saved):
    """Even with a consistent manifest, skops loads only allow-listed types."""
    forged = skops.io.dumps(HomeMadeClassifier().fit(parts[2], parts[3]))
    (copy_of_saved / "classifier.skops").write_bytes(forged)
    manifest = json.loads((copy_of_saved / "manifest.json").read_text())
    manifest["files"]["classifier.skops"] = file_sha256(copy_of_saved / "classifier.skops")
    (copy_of_saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="allow-list"):
        load_bundle(copy_of_saved)


def test_wrong_image_size_is_refused(loaded):
    with pytest.raises(InputError, match="image size 16 differs from the bundle's 32"):
        loaded.predict_proba(np.zeros((2, 16, 16, 1), np.float32))


def test_failed_save_leaves_no_folder_behind(parts, tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_module, "save_xgboost", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(make_bundle(parts, make_xgb()), tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_bundle(parts, saved, copy_of_saved, monkeypatch):
    monkeypatch.setattr(bundle_module, "write_json_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(make_bundle(parts, make_lr(), threshold=0.9), copy_of_saved)
    assert sorted(path.name for path in copy_of_saved.parent.iterdir()) == ["bundle"]
    assert (copy_of_saved / "manifest.json").read_bytes() == (saved / "manifest.json").read_bytes()


def test_overwrite_replaces_a_bundle_and_leaves_nothing_else(parts, copy_of_saved):
    save_bundle(make_bundle(parts, make_lr(), threshold=0.9), copy_of_saved)
    assert sorted(path.name for path in copy_of_saved.parent.iterdir()) == ["bundle"]
    assert json.loads((copy_of_saved / "bundle.json").read_text())["threshold"] == 0.9


def test_refuses_to_overwrite_a_folder_that_is_not_a_bundle(parts, tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a tlfusion bundle"):
        save_bundle(make_bundle(parts, make_lr()), tmp_path / "results")
    assert (tmp_path / "results" / "notes.txt").read_text() == "keep me"


def test_class_set_mismatch_is_refused(loaded):
    check_class_names(loaded, ["healthy", "fracture"])
    with pytest.raises(InputError, match="differ from the bundle's"):
        check_class_names(loaded, ["normal", "pneumonia"])


def test_meta_must_be_json(parts, tmp_path):
    with pytest.raises(InputError, match="not JSON-serialisable"):
        save_bundle(make_bundle(parts, make_lr(), meta={"when": object()}), tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lr", "svm", "rf", "knn", "xgb", "vote"])
def test_every_registry_classifier_round_trips(parts, tmp_path, name):
    classifiers = pytest.importorskip("tlfusion.models.classifiers")
    original = make_bundle(parts, classifiers.make_classifier(name))
    loaded = load_bundle(save_bundle(original, tmp_path / "bundle"))
    np.testing.assert_allclose(loaded.classifier.predict_proba(parts[2]), original.classifier.predict_proba(parts[2]))


def test_onnx_graphs_round_trip_and_match_keras(parts, tmp_path):
    models, _, Z, _, images = parts
    graphs = {name: onnx_graph(model) for name, model in models.items()}
    original = make_bundle(parts, make_lr(), onnx_graphs=graphs)
    folder = save_bundle(original, tmp_path / "bundle")
    assert (folder / "backbones" / "mobilenet_a.onnx").read_bytes() == graphs["mobilenet_a"]
    loaded = load_bundle(folder)
    assert loaded.onnx_graphs == graphs
    expected = original.classifier.predict_proba(Z[:6])
    np.testing.assert_allclose(loaded.predict_proba(images[:6]), expected, rtol=1e-4, atol=1e-4)


def test_altered_onnx_graph_is_refused(parts, tmp_path):
    models = parts[0]
    graphs = {name: onnx_graph(model) for name, model in models.items()}
    folder = save_bundle(make_bundle(parts, make_lr(), onnx_graphs=graphs), tmp_path / "bundle")
    with (folder / "backbones" / "mobilenet_a.onnx").open("ab") as graph:
        graph.write(b"\0")
    with pytest.raises(InputError, match=r"mobilenet_a\.onnx: file was altered"):
        load_bundle(folder)


def test_onnx_graph_for_an_unknown_backbone_is_refused(parts):
    with pytest.raises(InputError, match="ONNX graphs for unknown backbones"):
        make_bundle(parts, make_lr(), onnx_graphs={"other": b""})


def test_flip_bundle_predicts_from_the_mean_of_each_image_and_its_mirror(parts, tmp_path):
    models, _, _, _, images = parts
    loaded = load_bundle(save_bundle(make_bundle(parts, make_lr(), flip=True), tmp_path / "bundle"))
    extractor = feature_model(models["mobilenet_a"])
    mean = (extractor.predict(images[:6], verbose=0) + extractor.predict(images[:6, :, ::-1], verbose=0)) / 2
    assert loaded.flip and json.loads((tmp_path / "bundle" / "bundle.json").read_text())["flip"] is True
    expected = loaded.estimator.predict_proba(mean)
    np.testing.assert_allclose(loaded.predict_proba(images[:6]), expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(expected, make_bundle(parts, make_lr()).predict_proba(images[:6]), atol=1e-4)


def test_a_binary_bundle_json_keeps_the_format_older_versions_read(saved):
    """K-class support added keys for K-class bundles only: a binary bundle.json has exactly the keys it had."""
    info = json.loads((saved / "bundle.json").read_text())
    expected = {"format", "format_version", "backbones", "class_names", "threshold", "image_size", "clahe", "flip"}
    assert set(info) == expected | {"xgboost_models", "meta"}


def test_k_class_bundle_round_trips_with_its_classes_and_no_threshold(parts, tmp_path):
    models, fusion, Z, _, images = parts
    grades = np.arange(len(Z)) % 3
    classifier = make_xgb()
    settings = {"threshold": None, "class_names": ["0", "1", "2"], "ordinal": True}
    folder = save_bundle(make_bundle(parts, classifier, grades, **settings), tmp_path / "grades")
    info = json.loads((folder / "bundle.json").read_text())
    assert info["task"] == "multiclass" and info["ordinal"] is True and info["threshold"] is None
    loaded = load_bundle(folder)
    assert loaded.task == "multiclass" and loaded.class_names == ["0", "1", "2"] and loaded.ordinal
    np.testing.assert_allclose(
        loaded.predict_proba(images),
        fusion_pipeline(fusion, classifier).predict_proba(
            np.hstack([feature_model(m).predict(images, verbose=0) for m in models.values()])
        ),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"threshold": 0.4}, "predicts the most probable class; its threshold must be None"),
        ({"threshold": None, "class_names": ["0", "1", "1"]}, "K >= 3 distinct names"),
        ({"threshold": None, "class_names": ["0", "1", "2", "3"]}, "fitted on class codes 0..3"),
    ],
)
def test_inconsistent_k_class_bundles_are_refused(parts, changes, message):
    grades = np.arange(len(parts[2])) % 3
    with pytest.raises(InputError, match=message):
        make_bundle(parts, make_lr(), grades, **{"class_names": ["0", "1", "2"], **changes})


def test_a_binary_bundle_without_threshold_is_refused(parts):
    with pytest.raises(InputError, match="threshold must be in"):
        make_bundle(parts, make_lr(), threshold=None)
