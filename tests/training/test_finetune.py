"""Pretraining, fine-tuning, checkpoints and resume on tiny synthetic radiographs (MobileNetV2 alpha 0.35, 32 px)."""

import json
import os
from pathlib import Path

from tlfusion.config.pretraining import PretrainSettings
from tlfusion.training.task import TrainSettings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

from tlfusion.backbones import registry as backbones
from tlfusion.data.images import file_sha256
from tlfusion.errors import InputError
from tlfusion.training import finetune as training
from tlfusion.training import loop, model_cards, pretraining

ARCH = "mobilenet"  # MobileNetV1 at width 0.25: the registry's quickest model to build and trace
TINY = {"image_size": 32, "batch_size": 4}
ALPHA = {"alpha": 0.25}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pd.DataFrame:
    """16 synthetic images, two classes (a bright bar or a dark disc), 12 for training and 4 for validation."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        label = "fractured" if i % 2 else "normal"
        image = rng.integers(0, 60, (40, 36), dtype=np.uint8)
        if label == "fractured":
            cv2.line(image, (4, 4), (30, 34), 255, 3)
        else:
            cv2.circle(image, (18, 20), 9, 160, -1)
        path = folder / f"img{i:02d}.png"
        cv2.imwrite(str(path), image)
        rows.append([str(path), label, f"p{i}", f"s{i}", "val" if i >= 12 else "train", "leg"])
    return pd.DataFrame(rows, columns=["path", "label", "patient", "study", "split", "region"])


@pytest.fixture(scope="module")
def pretrained(table, tmp_path_factory):
    return pretraining.pretrain(
        table, ARCH, tmp_path_factory.mktemp("pretrain"), PretrainSettings(epochs=1, **TINY), options=ALPHA, verbose=0
    )


def test_pretrain_writes_a_reloadable_model_and_its_records(pretrained, table):
    out = pretrained.model_path.parent
    for name in ("model.keras", "checkpoint.keras", "state.json", "history.csv", "curves.png", "train.json"):
        assert (out / name).is_file(), name
    model = backbones.load_model_file(pretrained.model_path, expected=ARCH)
    assert model.get_layer("head").units == 2
    assert model.input.shape[1] == 32
    assert pretrained.best_epoch == 1 and len(pretrained.history) == 1
    assert set(pretrained.val_metrics) == {"val_loss", "val_accuracy"}
    summary = json.loads((out / "train.json").read_text())
    assert summary["classes"] == ["fractured", "normal"]
    assert summary["data"] == {"train": {"fractured": 6, "normal": 6}, "val": {"fractured": 2, "normal": 2}}
    seen = [line.split()[0] for line in (out / "seen_images.txt").read_text().splitlines()]
    assert seen == [file_sha256(path) for path in table["path"]]  # all 16 rows are train or val
    assert len(pd.read_csv(out / "history.csv")) == 1


def test_finetune_from_pretrained_warms_up_then_unfreezes_all_but_batchnorm(pretrained, table, tmp_path):
    result = training.finetune(
        table,
        ARCH,
        tmp_path,
        TrainSettings(weights=pretrained.model_path, warmup_epochs=1, epochs=2, **TINY, options=ALPHA),
        positive_class="fractured",
        verbose=0,
    )
    assert [row["phase"] for row in result.history] == ["warmup", "unfrozen"]
    val_aucs = {row["epoch"]: row["val_auc"] for row in result.history}
    assert result.best_epoch == max(val_aucs, key=val_aucs.get)  # the kept epoch is the one with the best val AUC
    assert result.val_metrics["val_auc"] == val_aucs[result.best_epoch]
    model = backbones.load_model_file(result.model_path, expected=ARCH)
    assert model.get_layer("head").units == 1
    checkpoint = keras.saving.load_model(tmp_path / "checkpoint.keras")
    batchnorm = [layer for layer in checkpoint.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert batchnorm and not any(layer.trainable for layer in batchnorm)
    assert checkpoint.get_layer("conv1").trainable
    before = keras.saving.load_model(pretrained.model_path).get_layer("conv_pw_13").get_weights()[0]
    assert np.abs(before - checkpoint.get_layer("conv_pw_13").get_weights()[0]).max() > 1e-6  # unfrozen: trained


def test_pretrain_from_imagenet_warms_up_the_head_then_keeps_batchnorm(table, tmp_path):
    imagenet = PretrainSettings(
        weights="imagenet", warmup_epochs=1, epochs=2, learning_rate=1e-3, unfrozen_learning_rate=1e-4, **TINY
    )
    result = pretraining.pretrain(table, "mobilenet", tmp_path, imagenet, verbose=0)  # ImageNet weights: alpha 1.0
    assert [row["phase"] for row in result.history] == ["warmup", "unfrozen"]
    checkpoint = keras.saving.load_model(tmp_path / "checkpoint.keras")
    start = backbones.build_backbone("mobilenet", 32, "imagenet", num_outputs=2)
    batchnorm = [layer for layer in checkpoint.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert batchnorm and not any(layer.trainable for layer in batchnorm)
    for name in ("conv_pw_13_bn", "conv_pw_13"):  # BatchNorm kept from ImageNet, the convolutions trained
        moved = np.abs(start.get_layer(name).get_weights()[0] - checkpoint.get_layer(name).get_weights()[0]).max()
        assert (moved > 1e-6) == (name == "conv_pw_13")
    card = model_cards.model_card({**json.loads((tmp_path / "train.json").read_text()), "config": {}}, "x", "cmd")
    assert "Start: ImageNet" in card and "head alone for 1 epoch(s) at lr 0.001" in card and "BatchNorm frozen" in card


def test_finetune_can_train_batchnorm_from_pretrained_weights(pretrained, table, tmp_path):
    training.finetune(
        table,
        ARCH,
        tmp_path,
        TrainSettings(
            weights=pretrained.model_path, warmup_epochs=0, epochs=1, batchnorm="train", **TINY, options=ALPHA
        ),
        positive_class="fractured",
        verbose=0,
    )
    checkpoint = keras.saving.load_model(tmp_path / "checkpoint.keras")
    batchnorm = [layer for layer in checkpoint.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert batchnorm and all(layer.trainable for layer in batchnorm)
    assert {layer.momentum for layer in batchnorm} == {loop.TRAINED_BATCHNORM_MOMENTUM}


def test_finetune_refuses_an_unknown_batchnorm_mode_as_a_callers_mistake(table, tmp_path):
    """An experiment's `batchnorm` is validated by its schema: a bad one here is a programming error (exit 1)."""
    with pytest.raises(ValueError, match="batchnorm") as raised:
        training.finetune(
            table,
            ARCH,
            tmp_path,
            TrainSettings(batchnorm="sometimes", **TINY, options=ALPHA),
            positive_class="fractured",
            verbose=0,
        )
    assert not isinstance(raised.value, InputError)


def test_resume_continues_from_the_checkpoint(pretrained, table, tmp_path, monkeypatch):
    pretraining.pretrain(table, ARCH, tmp_path, PretrainSettings(epochs=1, **TINY), options=ALPHA, verbose=0)
    first = json.loads((tmp_path / "state.json").read_text())
    assert first["history"][0]["loss"] == pytest.approx(pretrained.history[0]["loss"], rel=1e-5)  # same seed
    checkpoint = keras.saving.load_model(tmp_path / "checkpoint.keras")
    steps_per_epoch = int(checkpoint.optimizer.iterations.numpy())
    at_start = {}
    record_start = lambda self, logs=None: at_start.setdefault("w", self.model.get_weights())  # noqa: E731
    monkeypatch.setattr(loop.EpochRecorder, "on_train_begin", record_start)

    result = pretraining.pretrain(
        table, ARCH, tmp_path, PretrainSettings(epochs=2, **TINY), resume=True, options=ALPHA, verbose=0
    )

    state = json.loads((tmp_path / "state.json").read_text())
    assert state["epoch"] == 2 and [row["epoch"] for row in result.history] == [1, 2]
    assert result.history[0] == first["history"][0]
    for started, saved in zip(at_start["w"], checkpoint.get_weights(), strict=True):
        np.testing.assert_array_equal(started, saved)  # epoch 2 began from the checkpoint, not from scratch
    resumed = keras.saving.load_model(tmp_path / "checkpoint.keras")
    assert int(resumed.optimizer.iterations.numpy()) == 2 * steps_per_epoch  # optimizer state carried over
    assert not np.allclose(
        resumed.get_layer("conv_pw_13").get_weights()[0], checkpoint.get_layer("conv_pw_13").get_weights()[0]
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.assign(split="val"), "no rows with split 'train'"),
        (lambda t: t.assign(split="train"), "no rows with split 'val'"),
        (lambda t: t.assign(label="normal"), "only one class"),
    ],
)
def test_bad_tables_are_input_errors(table, tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        pretraining.pretrain(change(table), ARCH, tmp_path, PretrainSettings(**TINY), options=ALPHA, verbose=0)


def test_a_table_without_the_split_column_is_a_callers_mistake(table, tmp_path):
    with pytest.raises(ValueError, match="missing column") as raised:
        pretraining.pretrain(
            table.drop(columns="split"), ARCH, tmp_path, PretrainSettings(**TINY), options=ALPHA, verbose=0
        )
    assert not isinstance(raised.value, InputError)


def test_bad_backbone_weights_and_positive_class_are_input_errors(pretrained, table, tmp_path):
    with pytest.raises(InputError, match="unknown backbone"):
        pretraining.pretrain(table, "alexnet", tmp_path, PretrainSettings(**TINY), options=ALPHA, verbose=0)
    with pytest.raises(InputError, match="positive_class"):
        training.finetune(
            table, ARCH, tmp_path, TrainSettings(**TINY, options=ALPHA), positive_class="broken", verbose=0
        )
    val_one_class = table[(table["split"] == "train") | (table["label"] == "normal")]
    with pytest.raises(InputError, match="val AUC"):
        training.finetune(
            val_one_class, ARCH, tmp_path, TrainSettings(**TINY, options=ALPHA), positive_class="fractured", verbose=0
        )
    with pytest.raises(InputError, match="not efficientnetb0"):
        training.finetune(
            table,
            "efficientnetb0",
            tmp_path,
            TrainSettings(weights=pretrained.model_path, image_size=32),
            positive_class="fractured",
            verbose=0,
        )


def test_pretrain_and_ship_from_a_pretraining_yaml(table, tmp_path):
    """The YAML's settings reach `pretrain`, its validated config and per-source counts land in train.json, and the
    shipped folder holds the model, its card and the seen-images list."""
    import yaml

    images = Path(table["path"][0]).parent
    csv = table.assign(path=[Path(path).name for path in table["path"]])
    csv[["path", "label", "patient"]].to_csv(images / "pretrain_and_ship.csv", index=False)
    spec = {"image_size": 32, "epochs": 1, "batch_size": 4, "augment": False, "description": "Tiny."}
    spec["data_root"] = str(images)
    spec["sources"] = [{"name": "tiny", "csv": "pretrain_and_ship.csv", "patient_column": "patient"}]
    spec["split"] = {"test_fraction": 0.2, "val_fraction": 0.3, "seed": 0}
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "shipped" / "tiny_model"

    pretraining.pretrain_and_ship(str(tmp_path / "pretrain.yaml"), ARCH, str(out), str(tmp_path / "run"))

    summary = json.loads((out / "train.json").read_text())
    assert summary["settings"]["augment"] is False and summary["settings"]["image_size"] == 32
    assert summary["config"]["data_root"] == str(images) and summary["config"]["drop_splits"] == ["test"]
    assert summary["sources"]["tiny"]["train"] + summary["sources"]["tiny"]["val"] == summary["seen_images"]["count"]
    assert "test" not in summary["sources"]["tiny"]  # dropped before training
    assert set(summary["classes"]) == {"tiny/fractured", "tiny/normal"}
    assert "Tiny." in (out / "MODEL_CARD.md").read_text() and (out / "seen_images.txt").is_file()
    assert "tiny_model/model.keras" in json.loads((out.parent / "manifest.json").read_text())["files"]
