"""Multi-label fine-tuning, its losses, the multi-label bootstrap intervals and a tiny multi-label run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import write_png, xray_like
from tlfusion.backbones.registry import load_model_file
from tlfusion.cli import main
from tlfusion.errors import InputError
from tlfusion.evaluation import multilabel_metrics
from tlfusion.evaluation.schema import read_metrics
from tlfusion.training.multilabel import MultilabelLoss, asymmetric_loss, positive_weights

FINDINGS = ["Effusion", "Mass", "Nodule", "Edema"]


def write_chest_dataset(root: Path, images: int = 40) -> Path:
    """A `Data_Entry_2017.csv`-style set: findings drawn per image, Effusion and Edema images with a bright blob."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(images):
        present = [name for name, p in zip(FINDINGS, (0.4, 0.3, 0.3, 0.3), strict=True) if rng.random() < p]
        if i < len(FINDINGS):
            present = [FINDINGS[i]]  # every finding at least once
        blob = "Effusion" in present or "Edema" in present
        write_png(root / "images" / f"{i:05d}_000.png", xray_like(i, 32, bright_blob=blob))
        rows.append(
            {
                "path": f"images/{i:05d}_000.png",
                "Image Index": f"{i:05d}_000.png",
                "Finding Labels": "|".join(present) or "No Finding",
                "Patient ID": f"{i // 2:05d}",
            }
        )
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture
def chest_dataset(tmp_path: Path) -> Path:
    return write_chest_dataset(tmp_path / "chest")


def multilabel_experiment(folder: Path, data_root: Path, **changes) -> Path:
    raw = {
        "name": "tiny_chest",
        "task": "multilabel",
        "data": {"format": "chestxray14", "root": str(data_root), "csv": "labels.csv", "findings": FINDINGS},
        "split": {"test_fraction": 0.3, "val_fraction": 0.25},
        "image": {"size": 32},
        "backbones": [
            {"name": "mobilenetv2", "options": {"alpha": 0.35}},
            {"name": "mobilenetv2", "options": {"alpha": 0.35}},
        ],
        "finetune": {"warmup_epochs": 1, "epochs": 1, "batch_size": 8, "losses": ["bce", "asymmetric"]},
        "evaluate": {"bootstrap": 40},
        "semantic": {"losses": ["bce", "dual_weighted"], "unseen": ["Edema"], "epochs": 3, "dim": 8},
        "explain": {"cases": 2},
        **changes,
    }
    path = folder / "tiny_chest.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_asymmetric_loss_drops_easy_negatives_and_keeps_positives():
    y = np.array([[0.0, 1.0]], np.float32)
    easy_negative = np.array([[-6.0, 0.0]], np.float32)  # p(neg) = 0.0025 < margin 0.05
    hard_negative = np.array([[2.0, 0.0]], np.float32)
    positive_only = float(-np.log(0.5) / 2)
    assert float(asymmetric_loss(y, easy_negative)) == pytest.approx(positive_only, rel=1e-5)
    assert float(asymmetric_loss(y, hard_negative)) > positive_only + 0.1
    plain = float(MultilabelLoss("bce")(y, hard_negative))
    assert float(asymmetric_loss(y, hard_negative)) < plain  # negatives down-weighted by p_m ** 4


def test_balanced_loss_weighs_positives_by_the_negative_to_positive_ratio():
    Y = np.array([[1, 0], [0, 0], [0, 0], [0, 1]], np.float32)
    assert positive_weights(Y) == [3.0, 3.0]
    assert positive_weights(np.zeros((5, 1))) == [1.0]
    y, logits = np.array([[1.0, 0.0]], np.float32), np.zeros((1, 2), np.float32)
    balanced = float(MultilabelLoss("balanced", [3.0, 3.0])(y, logits))
    assert balanced == pytest.approx(float(MultilabelLoss("bce")(y, logits)) * 2, rel=1e-5)  # (3 + 1) / (1 + 1)


def test_multilabel_loss_survives_a_keras_round_trip_and_refuses_unknown_kinds():
    loss = MultilabelLoss("balanced", [2.0, 1.5])
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, MultilabelLoss) and again.kind == "balanced" and again.pos_weight == [2.0, 1.5]
    with pytest.raises(InputError, match="finetune.losses: unknown loss 'focal'"):
        MultilabelLoss("focal")


def test_finding_intervals_paired_delta_and_gzsl_intervals():
    rng = np.random.default_rng(1)
    Y = rng.integers(0, 2, (120, 3))
    good = Y + rng.normal(0, 0.6, Y.shape)
    noise = rng.normal(0, 1, Y.shape)
    groups = np.arange(120) // 2
    per_finding = multilabel_metrics.bootstrap_finding_auroc_ci(Y, good, groups, n_boot=200)
    observed = multilabel_metrics.multilabel_auroc(Y, good, ["a", "b", "c"])
    assert all(lo < observed[name] < hi for (lo, hi), name in zip(per_finding, "abc", strict=True))
    delta = multilabel_metrics.paired_bootstrap_mean_auroc_delta(Y, good, noise, groups, n_boot=200)
    expected = observed["mean"] - multilabel_metrics.multilabel_auroc(Y, noise, ["a", "b", "c"])["mean"]
    assert delta["delta"] == pytest.approx(expected) and 0 < delta["ci"][0] < delta["delta"] < delta["ci"][1]
    same = multilabel_metrics.paired_bootstrap_mean_auroc_delta(Y, good, good, groups, n_boot=50)
    assert same == {"delta": 0.0, "ci": [0.0, 0.0]}
    gzsl = multilabel_metrics.bootstrap_gzsl_ci(
        Y, np.hstack([good[:, :2], noise[:, 2:]]), groups, [0, 1], [2], n_boot=200
    )
    assert gzsl["seen"][0] > 0.7 and gzsl["unseen"][0] < 0.5 < gzsl["unseen"][1]
    assert gzsl["unseen"][0] <= gzsl["h"][0] and gzsl["h"][1] <= gzsl["seen"][1]


def test_a_multilabel_run_fine_tunes_chooses_its_loss_on_validation_and_reports_intervals(tmp_path, chest_dataset):
    out = tmp_path / "run"
    assert main(["run", str(multilabel_experiment(tmp_path, chest_dataset)), "--out", str(out)]) == 0
    document = read_metrics(out / "metrics.json")
    for key in ("mobilenetv2", "mobilenetv2_2"):
        choice = document["finetune"][key]
        assert set(choice["val_auc"]) == {"bce", "asymmetric"} and choice["chosen"] in choice["val_auc"]
        best = max(choice["val_auc"], key=choice["val_auc"].get)
        assert choice["chosen"] == best
        chosen = json.loads((out / "backbones" / key / choice["chosen"] / "train.json").read_text())
        assert json.loads((out / "backbones" / key / "train.json").read_text()) == chosen
        model = load_model_file(out / "backbones" / key / "model.keras")
        assert model.output.shape[-1] == len(FINDINGS) and chosen["settings"]["loss"] == choice["chosen"]
    rows = [row for row in document["results"] if row["model"] == "bce" and row["finding"] != "mean"]
    table = pd.read_csv(out / "data" / "table.csv")
    test = table[table["split"] == "test"]
    assert [row["positives"] for row in rows] == [
        int(test["labels"].fillna("").str.split("|").map(lambda found, n=name: n in found).sum()) for name in FINDINGS
    ]
    assert set(document["vs_bce"]) == {"dual_weighted"} and document["gzsl_ci"]["bce"].keys() == {"seen", "unseen", "h"}
    scores = pd.read_csv(out / "fit" / "semantic_scores.csv")
    assert len(scores) == 2 * len(test) and set(scores["model"]) == {"bce", "dual_weighted"}
    assert (out / "plots" / "auroc_per_finding.png").is_file()
    report = (out / "report.md").read_text()
    assert "dual_weighted − bce" in report and "positives" in report and "explanations/index.html" in report
    gallery = (out / "explanations" / "index.html").read_text()
    assert gallery.count("<tr><td>") == 2 and "Grad-CAM per finding" in gallery
    assert len(list((out / "explanations").glob("*_finding*.png"))) == 2 * 3  # 2 cases x top 3 findings


def test_top_findings_rank_by_probability_and_grad_cam_follows_one_output(tmp_path):
    from tlfusion.backbones.registry import build_backbone
    from tlfusion.explain.findings import finding_maps, top_findings

    assert top_findings(np.array([[0.1, 0.9, 0.5, 0.9]]), 3).tolist() == [[1, 3, 2]]
    keras.utils.set_random_seed(0)
    model = build_backbone("mobilenetv2", 64, num_outputs=3, alpha=0.35)
    head = model.get_layer("head")
    kernel, bias = head.get_weights()
    kernel[:, 2] = -kernel[:, 0]  # finding 2's logit is minus finding 0's: opposite evidence, other regions
    head.set_weights([kernel, bias])
    images = np.stack([xray_like(seed, 64, bright_blob=True)[..., None] for seed in range(2)]).astype(np.float32)
    maps = finding_maps({"a": model, "b": model}, images, [0, 2])
    assert set(maps) == {0, 2} and maps[0].shape == (2, 64, 64)
    assert maps[0].max() == 1.0  # each map divided by its peak
    assert not np.allclose(maps[0], maps[2])  # each finding's own logit, not one map for all
