"""Multi-task (a head per source target, masked) and label-free contrastive pretraining, on tiny CSV sources."""

import json
import os

from tlfusion.config.pretraining import PretrainSettings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

from tlfusion.backbones import registry as backbones
from tlfusion.config.pretraining import PretrainSource, PretrainSplit, PretrainTarget
from tlfusion.data.images import training_dataset
from tlfusion.data.pretraining import TARGET_PREFIX, pretraining_table
from tlfusion.errors import InputError
from tlfusion.training import pretraining
from tlfusion.training.model_cards import model_card
from tlfusion.training.pretraining_heads import Head, head_layout, head_targets, output_names
from tlfusion.training.pretraining_losses import ContrastiveLoss, HeadMetric, MultiTaskLoss

ARCH = "mobilenet"
TINY = {"image_size": 32, "batch_size": 4}
ALPHA = {"alpha": 0.25}


def _write_images(folder, count, rng):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = rng.integers(0, 60, (36, 36), dtype=np.uint8)
        cv2.circle(image, (18, 18), 4 + i % 8, 200, -1)
        cv2.imwrite(str(folder / f"img{i:02d}.png"), image)
        paths.append(f"{folder.name}/img{i:02d}.png")
    return paths


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two CSV sources: knees (grade 0-2, upstream train / val split) and hands (age in months, sex)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    knees = _write_images(root / "knee", 24, rng)
    pd.DataFrame(
        {
            "path": knees,
            "grade": [i % 3 for i in range(24)],
            "subject": [f"k{i // 2}" for i in range(24)],
            "split": ["val" if i >= 20 else "train" for i in range(24)],
        }
    ).to_csv(root / "knee.csv", index=False)
    hands = _write_images(root / "hand", 20, rng)
    pd.DataFrame(
        {"path": hands, "months": [20 + 9 * i for i in range(20)], "male": [i % 2 == 0 for i in range(20)]}
    ).to_csv(root / "hand.csv", index=False)
    knee = PretrainSource(
        name="knee",
        csv="knee.csv",
        label_column="grade",
        patient_column="subject",
        split_column="split",
        split=PretrainSplit(test_values=["val"], val_fraction=0.25),
    )
    hand = PretrainSource(
        name="hand",
        csv="hand.csv",
        label_column="male",
        targets=[PretrainTarget(column="months", kind="regression"), PretrainTarget(column="male")],
    )
    return root, [knee, hand]


@pytest.fixture(scope="module")
def table(sources):
    root, listed = sources
    return pretraining_table(listed, root, PretrainSplit(test_fraction=0.2, val_fraction=0.25))


def test_the_table_drops_upstream_test_values_and_holds_each_heads_column(table):
    knee = table[table["source"] == "knee"]
    assert len(knee) == 20 and not knee["path"].str.contains("img2[0-3]").any()  # upstream val rows: the test part
    assert set(table["split"]) == {"train", "val"}
    assert knee[TARGET_PREFIX + "hand/months"].isna().all()
    assert table.loc[table["source"] == "hand", TARGET_PREFIX + "knee/grade"].isna().all()
    assert "sha256" in table.columns


def test_heads_and_targets_follow_the_sources(sources, table):
    heads = head_layout(sources[1], table[table["split"] == "train"])
    assert [(h.name, h.kind, h.offset, h.size) for h in heads] == [
        ("knee/grade", "classes", 0, 3),
        ("hand/months", "regression", 3, 1),
        ("hand/male", "classes", 4, 2),
    ]
    assert output_names(heads)[:4] == ["knee/grade=0", "knee/grade=1", "knee/grade=2", "hand/months"]
    targets = head_targets(table, heads)
    hand = (table["source"] == "hand").to_numpy()
    assert np.isnan(targets[hand, 0]).all() and not np.isnan(targets[hand, 1]).any()
    months = pd.to_numeric(table.loc[hand, TARGET_PREFIX + "hand/months"]).to_numpy()
    np.testing.assert_allclose(targets[hand, 1] * heads[1].std + heads[1].mean, months, rtol=1e-5)


def test_a_constant_class_head_is_an_input_error(sources, table):
    train = table[table["split"] == "train"].copy()
    train[TARGET_PREFIX + "hand/male"] = train[TARGET_PREFIX + "hand/male"].where(train["source"] != "hand", "True")
    with pytest.raises(InputError, match="hand/male"):
        head_layout(sources[1], train)


def test_the_multitask_loss_is_the_sum_of_masked_head_means():
    heads = [Head("a", "classes", 0, 2, ("x", "y")), Head("b", "regression", 2, 1, mean=10.0, std=2.0)]
    logits = np.array([[2.0, 0.0, 0.5], [0.0, 1.0, -1.0], [1.0, 1.0, 3.0]], np.float32)
    targets = np.array([[0, np.nan], [1, np.nan], [np.nan, 2.0]], np.float32)
    loss = float(MultiTaskLoss(heads)(targets, logits))
    log_softmax = logits[:2, :2] - np.log(np.exp(logits[:2, :2]).sum(axis=1, keepdims=True))
    expected = -(log_softmax[0, 0] + log_softmax[1, 1]) / 2 + (3.0 - 2.0) ** 2
    assert loss == pytest.approx(expected, rel=1e-5)
    metric = HeadMetric(heads[1], 1)
    metric.update_state(targets, logits)
    assert float(metric.result()) == pytest.approx(1.0 * 2.0)  # |3 - 2| in standardised units, times the std
    accuracy = HeadMetric(heads[0], 0)
    accuracy.update_state(targets, logits)
    assert float(accuracy.result()) == pytest.approx(1.0)


def test_the_contrastive_loss_matches_nt_xent_by_hand():
    rng = np.random.default_rng(1)
    views = rng.normal(size=(6, 4)).astype(np.float32)
    loss = float(ContrastiveLoss(temperature=0.5)(np.zeros((6, 1), np.float32), views))
    unit = views / np.linalg.norm(views, axis=1, keepdims=True)
    similarity = unit @ unit.T / 0.5
    np.fill_diagonal(similarity, -np.inf)
    partner = np.arange(6) + 1 - 2 * (np.arange(6) % 2)
    log_probability = similarity - np.log(np.exp(similarity).sum(axis=1, keepdims=True))
    assert loss == pytest.approx(-log_probability[np.arange(6), partner].mean(), rel=1e-4)
    aligned = np.repeat(np.eye(3, 4, dtype=np.float32), 2, axis=0)
    assert float(ContrastiveLoss(0.5)(np.zeros((6, 1)), aligned)) < loss  # matching views: a lower loss


def test_two_views_of_an_image_are_adjacent(table):
    paths = table["path"].iloc[:3]
    batch, _ = next(iter(training_dataset(paths, np.zeros((3, 1), np.float32), 32, False, 3, seed=0, views=2)))
    assert batch.shape[0] == 6
    for pair in range(3):
        np.testing.assert_array_equal(batch[2 * pair], batch[2 * pair + 1])  # without augmentation: equal


def test_multitask_pretraining_writes_a_backbone_with_every_head_and_resumes(sources, table, tmp_path):
    out = tmp_path / "multitask"
    pretraining.pretrain(
        table,
        ARCH,
        out,
        PretrainSettings(objective="multitask", epochs=1, **TINY),
        sources=sources[1],
        options=ALPHA,
        verbose=0,
    )
    result = pretraining.pretrain(
        table,
        ARCH,
        out,
        PretrainSettings(objective="multitask", epochs=2, **TINY),
        sources=sources[1],
        resume=True,
        options=ALPHA,
        verbose=0,
    )
    assert [row["epoch"] for row in result.history] == [1, 2]  # the checkpoint (custom loss, metrics) reloaded
    model = backbones.load_model_file(result.model_path, expected=ARCH)
    assert model.get_layer("head").units == 6
    assert {"val_knee_grade_accuracy", "val_hand_months_mae", "val_hand_male_accuracy"} <= set(result.val_metrics)
    summary = json.loads((out / "train.json").read_text())
    assert summary["task"] == "multitask" and summary["settings"]["objective"] == "multitask"
    assert [head["name"] for head in summary["heads"]] == ["knee/grade", "hand/months", "hand/male"]


def test_contrastive_pretraining_projects_to_its_width(table, tmp_path):
    result = pretraining.pretrain(
        table,
        ARCH,
        tmp_path,
        PretrainSettings(objective="contrastive", projection_dim=8, epochs=1, **TINY),
        options=ALPHA,
        verbose=0,
    )
    model = keras.saving.load_model(result.model_path)
    assert model.get_layer("head").units == 8
    assert np.isfinite(result.val_metrics["val_loss"])
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["settings"]["temperature"] == 0.2
    card = model_card(summary, "tiny_contrastive", "tlfusion pretrain x.yaml")
    assert "| label (not used by the label-free objective) | train | val |" in card and "| class |" not in card


def test_multitask_without_sources_is_a_callers_mistake(table, tmp_path):
    with pytest.raises(ValueError, match="sources"):
        pretraining.pretrain(
            table, ARCH, tmp_path, PretrainSettings(objective="multitask", epochs=1, **TINY), options=ALPHA, verbose=0
        )


def test_test_values_need_a_split_column():
    with pytest.raises(ValueError, match="split_column"):
        PretrainSource(name="k", csv="k.csv", split=PretrainSplit(test_values=["val"]))


def test_the_eta_line_counts_the_epochs_left():
    from tlfusion.training.loop import run_eta

    state = {"epoch": 3, "best_epoch": 2, "wall_seconds": 180.0, "stopped": False}
    assert run_eta(state, 12) == "epoch 3/12, best 2, 3.0 min so far, about 9.0 min left"
    assert run_eta(state | {"stopped": True}, 12).endswith("about 0.0 min left (stopped early)")
