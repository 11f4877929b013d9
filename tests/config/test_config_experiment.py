"""Experiment schema: validation errors name the key, overrides, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tlfusion.config.experiment import FinetuneSpec, ImageSpec, load_experiment
from tlfusion.config.pretraining import PretrainSettings, load_pretraining_config
from tlfusion.errors import InputError
from tlfusion.training import finetune as training
from tlfusion.training import pretraining
from tlfusion.training.task import TrainSettings


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
    with pytest.raises(InputError, match="--data-root .*elsewhere: folder not found"):
        load_experiment(path, data_root=tmp_path / "elsewhere")
    with pytest.raises(InputError, match=r"data.root: folder not found: .* with --data-root DIR, or --set data.root"):
        load_experiment(write_experiment(tmp_path, Path("absent")))
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
    folder = Path(__file__).resolve().parents[2] / "experiments"
    for path in sorted(folder.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "backbones" in raw:
            from tlfusion.config.experiment import Experiment

            Experiment.model_validate(raw)
        else:  # a pretraining spec
            from tlfusion.config.pretraining import load_pretraining_config

            assert load_pretraining_config(path).sources


def csv_source(folder: Path, root: str) -> Path:
    """An experiment whose one CSV source has `root` (as a shipped experiment has `../../shared/data/...`)."""
    return write_experiment(folder, Path(root), data={"format": "csv", "root": root, "csv": "labels.csv"})


def test_data_root_takes_the_roots_trailing_folder_names_longest_first_then_itself(tmp_path):
    experiment = csv_source(tmp_path, "../../shared/data/fracatlas")
    holder = tmp_path / "copy"
    (holder / "fracatlas").mkdir(parents=True)
    (holder / "fracatlas" / "labels.csv").write_text("path,label\n")
    assert load_experiment(experiment, data_root=holder).data[0].root == str(holder / "fracatlas")
    assert load_experiment(experiment, data_root=holder / "fracatlas").data[0].root == str(holder / "fracatlas")
    (holder / "data" / "fracatlas").mkdir(parents=True)  # the longer match wins once it holds the labels file
    assert load_experiment(experiment, data_root=holder).data[0].root == str(holder / "fracatlas")
    (holder / "data" / "fracatlas" / "labels.csv").write_text("path,label\n")
    assert load_experiment(experiment, data_root=holder).data[0].root == str(holder / "data" / "fracatlas")


def test_data_root_without_the_data_names_what_it_tried_and_the_fix(tmp_path):
    experiment = csv_source(tmp_path, "../shared/fracatlas")
    (tmp_path / "empty" / "fracatlas").mkdir(parents=True)  # a folder without labels.csv is not the data set
    with pytest.raises(InputError) as error:
        load_experiment(experiment, data_root=tmp_path / "empty")
    assert str(error.value) == (
        f"data.root: folder not found under --data-root {tmp_path / 'empty'}: no folder holding labels.csv at "
        f"{tmp_path / 'empty/shared/fracatlas'}, {tmp_path / 'empty/fracatlas'}, {tmp_path / 'empty'}; "
        "point --data-root at the folder that holds 'fracatlas' or at that folder itself"
    )


def test_data_root_with_several_sources_never_falls_back_to_the_folder_itself(tmp_path, folder_dataset):
    sources = [{"format": "folder", "root": f"../x/{name}"} for name in ("folder", "other")]
    experiment = write_experiment(tmp_path, folder_dataset, data=sources)
    with pytest.raises(InputError, match=r"^data.1.root: folder not found .*holds 'other'$"):
        load_experiment(experiment, data_root=folder_dataset.parent)
    (tmp_path / "other").mkdir()
    roots = [spec.root for spec in load_experiment(experiment, data_root=tmp_path).data]
    assert roots == [str(folder_dataset), str(tmp_path / "other")]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.epochz=3", "finetune.epochz: unknown key (did you mean 'epochs'?)"),
        ("finetun.epochs=3", "finetun: unknown key (did you mean 'finetune'?)"),
        ("data.rooot=x", "data.0.rooot: unknown key (did you mean 'root'?)"),
        ("backbones.0.optoins={}", "backbones.0.optoins: unknown key (did you mean 'options'?)"),
        ("backbones.0.name=mobilenet_v2", "unknown backbone ['mobilenet_v2'] (did you mean 'mobilenetv2'?)"),
        ("classifiers.models=[lr, xgboost]", "unknown classifier ['xgboost'] (did you mean 'xgb'?)"),
        ("finetune.zzz=3", "finetune.zzz: unknown key; "),
    ],
)
def test_errors_suggest_the_closest_key_or_name(tmp_path, folder_dataset, override, message):
    with pytest.raises(InputError) as error:
        load_experiment(write_experiment(tmp_path, folder_dataset), [override])
    assert message in f"{error.value}; "


def write_pretraining(folder: Path, **changes) -> Path:
    raw = {"data_root": "data", "weights": "start/model.keras", "sources": [{"name": "a", "csv": "a.csv"}], **changes}
    path = folder / "pretrain.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_pretraining_config_resolves_paths_and_fills_the_pretrain_defaults(tmp_path):
    config = load_pretraining_config(write_pretraining(tmp_path, epochs=3))
    assert config.data_root == str(tmp_path / "data") and config.weights == str(tmp_path / "start" / "model.keras")
    assert config.settings() == {**PretrainSettings().model_dump(), "epochs": 3, "weights": config.weights}
    assert config.drop_splits == ["test"] and config.split.test_fraction == 0.2


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epoch": 3}, r"pretrain.yaml: epoch: unknown key \(did you mean 'epochs'\?\)"),
        (
            {"sources": [{"name": "a", "csv": "a.csv", "label_colum": "y"}]},
            r"sources.0.label_colum: unknown key .*'label_column'",
        ),
        ({"sources": [{"name": "a", "csv": "a.csv", "regions": ["leg"]}]}, "'regions' needs 'region_column'"),
        ({"sources": []}, "sources: List should have at least 1 item"),
        ({"split": {"seed": 1, "group": "study"}}, "split.group: unknown key"),
    ],
)
def test_pretraining_config_errors_name_the_file_and_key(tmp_path, changes, message):
    with pytest.raises(InputError, match=message):
        load_pretraining_config(write_pretraining(tmp_path, **changes))


def test_training_function_defaults_are_the_config_defaults():
    """One source of defaults: `TrainSettings` (what `finetune` takes) defaults to the config models' field defaults,
    and `pretrain`'s default settings are `PretrainSettings()`."""
    import dataclasses
    import inspect

    fields = {field.name: field.default for field in dataclasses.fields(TrainSettings)}
    # `losses` and `head` are the stage's choices (tlfusion.training.multilabel, `finetune(head=...)`), not settings
    for name, value in FinetuneSpec().model_dump(exclude={"enabled", "losses", "head"}).items():
        assert fields[name] == value, name
    assert inspect.signature(training.finetune).parameters["head"].default == FinetuneSpec().head
    assert fields["image_size"] == ImageSpec().size and fields["clahe"] == ImageSpec().clahe
    assert inspect.signature(pretraining.pretrain).parameters["settings"].default == PretrainSettings()
