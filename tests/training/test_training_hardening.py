"""Resuming training from a damaged checkpoint or state file names the file (exit 2), never a Keras traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import SIZE, truncate, write_png, xray_like
from tlfusion.backbones.registry import build_backbone
from tlfusion.config.pretraining import PretrainSettings
from tlfusion.errors import InputError
from tlfusion.training import pretraining


@pytest.fixture
def resume_folder(tmp_path) -> tuple[Path, pd.DataFrame]:
    """An interrupted pretraining's folder (state after epoch 1, a checkpoint) and its table."""
    rows = [
        [
            str(write_png(tmp_path / "images" / f"{i}.png", xray_like(i, 32))),
            f"c{i % 2}",
            f"p{i}",
            "train" if i < 6 else "val",
        ]
        for i in range(8)
    ]
    table = pd.DataFrame(rows, columns=["path", "label", "patient", "split"])
    out = tmp_path / "pretrain"
    out.mkdir()
    build_backbone("mobilenetv2", SIZE, alpha=0.35).save(out / "checkpoint.keras")
    state = {"epoch": 1, "phase": "all", "best": 1.0, "best_epoch": 1, "wait": 0, "stopped": False}
    state |= {"wall_seconds": 1.0, "history": [], "task": ["pretrain", "mobilenetv2", 2]}
    (out / "state.json").write_text(json.dumps(state))
    return out, table


@pytest.mark.parametrize(
    ("damaged", "message"),
    [("state.json", "unreadable JSON"), ("checkpoint.keras", "not a complete Keras model file")],
)
def test_resuming_from_a_damaged_checkpoint_names_the_file(resume_folder, damaged, message):
    out, table = resume_folder
    truncate(out / damaged)
    with pytest.raises(InputError, match=re.escape(f"{out / damaged}: {message}")):
        pretraining.pretrain(
            table,
            "mobilenetv2",
            out,
            PretrainSettings(epochs=2, image_size=SIZE, batch_size=4),
            resume=True,
            options={"alpha": 0.35},
            verbose=0,
        )
