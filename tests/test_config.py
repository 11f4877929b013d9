"""Experiment schema: validation errors name the key, overrides, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tlfusion.config import load_experiment
from tlfusion.errors import InputError


def write_experiment(folder: Path, data_root: Path, **changes) -> Path:
    raw = {
        "name": "tiny",
        "positive_class": "abnormal",
        "data": {"format": "folder", "root": str(data_root)},
        "backbones": [{"name": "mobilenetv2", "options": {"alpha": 0.35}}],
        **changes,
    }
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_and_data_as_list(tmp_path, folder_dataset):
    experiment = load_experiment(write_experiment(tmp_path, folder_dataset))
    assert experiment.image.size == 224 and experiment.classifiers.models[0] == "lr"
    assert experiment.data[0].root == str(folder_dataset.resolve())


def test_unknown_key_is_named(tmp_path, folder_dataset):
    path = write_experiment(tmp_path, folder_dataset, finetune={"epochz": 3})
    with pytest.raises(InputError, match=r"experiment.yaml: finetune.epochz: unknown key"):
        load_experiment(path)


def test_wrong_type_is_named(tmp_path, folder_dataset):
    with pytest.raises(InputError, match=r"image.size"):
        load_experiment(write_experiment(tmp_path, folder_dataset, image={"size": "big"}))


def test_overrides_reach_nested_keys_and_list_items(tmp_path, folder_dataset):
    path = write_experiment(tmp_path, folder_dataset)
    experiment = load_experiment(path, ["finetune.epochs=3", "backbones.0.name=densenet121", "image.clahe=true"])
    assert experiment.finetune.epochs == 3 and experiment.backbones[0].name == "densenet121"
    assert experiment.image.clahe is True
    with pytest.raises(InputError, match="expected key=value"):
        load_experiment(path, ["finetune.epochs"])
    with pytest.raises(InputError, match="unknown key"):
        load_experiment(path, ["finetune.nope=1"])


def test_data_root_and_missing_files(tmp_path, folder_dataset):
    path = write_experiment(tmp_path, Path("folder"))
    assert load_experiment(path, data_root=folder_dataset.parent).data[0].root == str(folder_dataset.resolve())
    with pytest.raises(InputError, match="data.root: folder not found"):
        load_experiment(path, data_root=tmp_path / "elsewhere")
    weights = write_experiment(tmp_path, folder_dataset, backbones=[{"name": "mobilenetv2", "weights": "no.keras"}])
    with pytest.raises(InputError, match="weights: file not found"):
        load_experiment(weights)
    with pytest.raises(InputError, match="not found"):
        load_experiment(tmp_path / "absent.yaml")


def test_binary_needs_positive_class_and_bad_yaml(tmp_path, folder_dataset):
    with pytest.raises(InputError, match="positive_class"):
        load_experiment(write_experiment(tmp_path, folder_dataset, positive_class=None))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_experiment(bad)


def test_multiscale_features_are_for_fewshot_experiments_only(tmp_path, folder_dataset):
    with pytest.raises(InputError, match=r"features.stages > 1 .* is for few-shot experiments; a binary"):
        load_experiment(write_experiment(tmp_path, folder_dataset, features={"stages": 2}))
    fewshot = load_experiment(write_experiment(tmp_path, folder_dataset, task="fewshot", features={"stages": 2}))
    assert fewshot.features.stages == 2


def test_shipped_experiments_validate():
    folder = Path(__file__).resolve().parents[1] / "experiments"
    for path in sorted(folder.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "backbones" in raw:
            from tlfusion.config import Experiment

            Experiment.model_validate(raw)
        else:  # a pretraining spec
            from tlfusion.training import load_pretraining_config

            assert load_pretraining_config(path)["sources"]
