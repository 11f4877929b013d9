"""Shipped files: `saved_models/` matches its manifest and every model loads; the ImageNet files match their sha256."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tlfusion.backbones.imagenet import IMAGENET_DIR, OFFLINE_FILES
from tlfusion.backbones.registry import FEATURES_LAYER, architecture_of, load_model_file
from tlfusion.data.images import file_sha256

SAVED_MODELS = Path(__file__).resolve().parents[1] / "saved_models"
MANIFEST = json.loads((SAVED_MODELS / "manifest.json").read_text())["files"]
SHIPPED_MODELS = sorted(path.parent.name for path in SAVED_MODELS.glob("*/model.keras"))


def test_manifest_lists_exactly_the_shipped_files():
    on_disk = {
        path.relative_to(SAVED_MODELS).as_posix()
        for path in SAVED_MODELS.rglob("*")
        if path.is_file() and path.name != "manifest.json"
    }
    assert on_disk == set(MANIFEST)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_shipped_file_has_its_manifest_size_and_sha256(name):
    path = SAVED_MODELS / name
    assert path.is_file(), f"{name} is in the manifest but missing"
    assert path.stat().st_size == MANIFEST[name]["bytes"]
    assert file_sha256(path) == MANIFEST[name]["sha256"]


@pytest.mark.parametrize("folder", SHIPPED_MODELS)
def test_shipped_model_loads_as_its_trained_architecture(folder):
    expected = json.loads((SAVED_MODELS / folder / "train.json").read_text())["backbone"]
    model = load_model_file(SAVED_MODELS / folder / "model.keras", expected=expected)
    assert architecture_of(model) == expected
    assert len(model.get_layer(FEATURES_LAYER).output.shape) == 2


def test_every_model_folder_ships_a_model():
    folders = sorted(path.name for path in SAVED_MODELS.iterdir() if path.is_dir())
    assert folders and folders == SHIPPED_MODELS


@pytest.mark.parametrize("architecture", sorted(OFFLINE_FILES))
def test_imagenet_resource_matches_its_sha256(architecture):
    shipped = OFFLINE_FILES[architecture]
    assert shipped.path.parent == IMAGENET_DIR and shipped.path.is_file()
    assert file_sha256(shipped.path) == shipped.sha256


@pytest.mark.parametrize("name", ["fewshot_covid", "fewshot_mura_humerus"])
def test_fewshot_experiments_use_the_development_screens_stage_count(name):
    repo = Path(__file__).resolve().parents[1]
    experiment = yaml.safe_load((repo / "experiments" / f"{name}.yaml").read_text())
    screen = json.loads((repo / "benchmarks" / "results" / "fewshot_screen.json").read_text())
    assert experiment["features"]["stages"] == screen["decisions"]["stages"]
