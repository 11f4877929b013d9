"""Shipping a pretraining run: files copied, MODEL_CARD.md from train.json, the manifest's sizes and hashes."""

from __future__ import annotations

import json

from tlfusion.data.images import file_sha256
from tlfusion.fileio import write_json
from tlfusion.training.model_cards import SHIPPED_FILES, model_card, ship_pretrained

SUMMARY = {
    "backbone": "mobilenetv2",
    "settings": {
        "weights": "imagenet",
        "image_size": 32,
        "warmup_epochs": 1,
        "epochs": 3,
        "batch_size": 4,
        "learning_rate": 0.001,
        "unfrozen_learning_rate": 0.0001,
        "patience": 4,
        "seed": 0,
        "augment": True,
        "clahe": False,
        "batchnorm": "auto",
    },
    "config": {"description": "A test model.", "hold_out_policy": "No test image.", "limits": "Tiny."},
    "environment": {"platform": "Linux-x", "cpu_count": 2, "packages": {"tensorflow": "2.x", "keras": "3.x"}},
    "sources": {"fa": {"train": 3, "val": 1}},
    "data": {"train": {"fa/a": 2, "fa/b": 1}, "val": {"fa/a": 1}},
    "classes": ["fa/a", "fa/b"],
    "val_metrics": {"val_loss": 0.5, "val_accuracy": 0.75},
    "seen_images": {"count": 4},
    "epochs_run": 2,
    "stopped_early": True,
    "best_epoch": 1,
    "wall_seconds": 90.0,
}


def test_model_card_describes_data_schedule_and_machine():
    card = model_card(SUMMARY, "mobilenetv2_test", "tlfusion pretrain x.yaml --arch mobilenetv2 --out y")
    assert card.startswith("# mobilenetv2_test: mobilenetv2 pretrained in-domain on radiographs\n\nA test model.")
    assert "| fa | 3 | 1 |" in card and "| fa/b | 1 | 0 |" in card
    assert "Start: ImageNet" in card and "head alone for 1 epoch(s) at lr 0.001, then every layer at lr 0.0001" in card
    assert "BatchNorm frozen" in card and "Ran 2 epochs (stopped early)" in card
    assert "val_loss 0.5000, val_accuracy 0.7500" in card
    assert "1.5 min on Linux-x, 2 CPU cores\n(shared), GPUs: none; TensorFlow 2.x, Keras 3.x." in card
    assert card.rstrip().endswith("Tiny.")


def test_ship_pretrained_copies_the_run_and_updates_the_manifest(tmp_path):
    run, ship = tmp_path / "run", tmp_path / "saved_models" / "mobilenetv2_test"
    write_json(run / "train.json", SUMMARY)
    for name in ("model.keras", "seen_images.txt", "history.csv"):
        (run / name).write_bytes(name.encode())
    write_json(tmp_path / "saved_models" / "manifest.json", {"files": {"other/model.keras": {"bytes": 1}}})

    assert ship_pretrained(run, ship, "cmd") == ship

    shipped = sorted(path.name for path in ship.iterdir())
    assert shipped == sorted(["MODEL_CARD.md", "model.keras", "seen_images.txt", "history.csv", "train.json"])
    assert set(shipped) <= set(SHIPPED_FILES)
    manifest = json.loads((tmp_path / "saved_models" / "manifest.json").read_text())
    assert list(manifest["files"]) == sorted(["other/model.keras", *(f"mobilenetv2_test/{name}" for name in shipped)])
    card = ship / "MODEL_CARD.md"
    assert manifest["files"]["mobilenetv2_test/MODEL_CARD.md"] == {
        "bytes": card.stat().st_size,
        "sha256": file_sha256(card),
    }
    assert not list(ship.glob(".*"))  # no temporary file left behind
