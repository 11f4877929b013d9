"""What a training run leaves beside its model: `history.csv`, `curves.png` and `train.json`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tlfusion.fileio import write_atomic, write_json
from tlfusion.training.provenance import SEEN_IMAGES, TRAINING_PACKAGES, environment
from tlfusion.training.task import TrainingTask, TrainResult

TRAIN_JSON = "train.json"
HISTORY = "history.csv"
CURVES = "curves.png"


def write_records(
    out_dir: Path,
    task: TrainingTask,
    result: TrainResult,
    state: dict,
    settings: dict,
    extra: dict,
    train: pd.DataFrame,
    val: pd.DataFrame,
) -> dict:
    """`history.csv`, `curves.png` and `train.json` (`extra` added to its fields) of a finished run; returns what
    train.json holds."""
    history = pd.DataFrame(result.history)
    write_atomic(out_dir / HISTORY, lambda temp: history.to_csv(temp, index=False))
    plot_curves(history, out_dir / CURVES, task.metric)
    summary = {
        "task": task.kind,
        "backbone": task.backbone,
        "settings": settings,
        **extra,
        "data": {
            name: part["label"].astype(str).value_counts().sort_index().to_dict()
            for name, part in (("train", train), ("val", val))
        },
        "epochs_run": state["epoch"],
        "stopped_early": state["stopped"],
        "best_epoch": result.best_epoch,
        "monitor": task.monitor,
        "val_metrics": result.val_metrics,
        "wall_seconds": round(state["wall_seconds"], 1),
        "seen_images": {"file": SEEN_IMAGES, "count": len(train) + len(val)},
        "environment": environment(*TRAINING_PACKAGES),
    }
    write_json(out_dir / TRAIN_JSON, summary)
    return summary


def plot_curves(history: pd.DataFrame, path: Path, metric: str) -> None:
    """Loss and `metric` per epoch, training and validation, with the phase changes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, name in zip(axes, ("loss", metric), strict=True):
        for column, style in ((name, "-o"), (f"val_{name}", "-s")):
            if column in history:
                axis.plot(history["epoch"], history[column], style, label=column)
        for epoch in history["epoch"][history["phase"].ne(history["phase"].shift()) & (history.index > 0)]:
            axis.axvline(epoch - 0.5, color="grey", linestyle=":")
        axis.set_xlabel("epoch")
        axis.set_title(name)
        axis.legend()
    figure.tight_layout()
    write_atomic(path, lambda temp: figure.savefig(temp, dpi=100))
    plt.close(figure)
