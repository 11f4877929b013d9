"""Shipping a pretrained backbone: its files copied beside a MODEL_CARD.md, and the shipped files' manifest."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tlfusion.data.images import file_sha256
from tlfusion.fileio import write_atomic, write_json, write_text
from tlfusion.training.loop import MODEL, TRAINED_BATCHNORM_MOMENTUM
from tlfusion.training.provenance import SEEN_IMAGES
from tlfusion.training.records import CURVES, HISTORY, TRAIN_JSON
from tlfusion.training.task import trains_batchnorm

SHIPPED_FILES = (MODEL, "MODEL_CARD.md", SEEN_IMAGES, TRAIN_JSON, HISTORY, CURVES)


def ship_pretrained(
    run_dir: str | Path, ship_dir: str | Path, command: str, summary: Mapping[str, Any] | None = None
) -> Path:
    """Copy a pretraining run's shippable files to `ship_dir`, write its MODEL_CARD.md (from `summary`, the run's
    train.json, read from `run_dir` when not given) and update the manifest.

    The manifest (`ship_dir/../manifest.json`) lists every shipped file with its size and sha256.
    """
    run_dir, ship_dir = Path(run_dir), Path(ship_dir)
    ship_dir.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        if (run_dir / name).is_file():
            write_atomic(ship_dir / name, lambda temp, source=run_dir / name: shutil.copyfile(source, temp))
    summary = summary or json.loads((run_dir / TRAIN_JSON).read_text())
    write_text(ship_dir / "MODEL_CARD.md", model_card(summary, ship_dir.name, command))
    manifest_path = ship_dir.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"files": {}}
    for name in SHIPPED_FILES:
        path = ship_dir / name
        if path.is_file():
            manifest["files"][f"{ship_dir.name}/{name}"] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    write_json(manifest_path, manifest)
    return ship_dir


def model_card(summary: Mapping[str, Any], name: str, command: str) -> str:
    """MODEL_CARD.md text from a pretraining run's `train.json`."""
    settings, config = summary["settings"], summary.get("config", {})
    metrics = ", ".join(f"{key} {value:.4f}" for key, value in summary["val_metrics"].items())
    return f"""# {name}: {summary["backbone"]} pretrained in-domain on radiographs

{config.get("description", "").strip()}

Input: one grayscale channel in [0, 255], {settings["image_size"]}x{settings["image_size"]} (aspect kept, black
padding: `tlfusion.data.images.load_image`). Layers `features` (pooled penultimate features) and `head`
({_head_description(summary)}). Load with `tlfusion.backbones.registry.load_model_file` or pass the
file as `weights=` to `build_backbone` / `training.finetune` (the head is replaced).

## Data ({summary["seen_images"]["count"]} images; sha256 of each in `{SEEN_IMAGES}`)

{_data_tables(summary)}

## Held-out policy

{config.get("hold_out_policy", "").strip()}

## Training

Start: {_start_description(settings.get("weights"))}. {_objective_description(summary)}
Adam, batch {settings["batch_size"]}; {_schedule_description(settings)};
augmentation {"on" if settings["augment"] else "off"} (flip, +-10 deg rotation,
zoom/crop, brightness, contrast), CLAHE {"on" if settings["clahe"] else "off"}, seed {settings["seed"]}; up to
{settings["epochs"]} epochs with early stopping on val loss (patience {settings["patience"]}).
Ran {summary["epochs_run"]} epochs{" (stopped early)" if summary["stopped_early"] else ""}; best epoch
{summary["best_epoch"]} (kept as `model.keras`).

Validation (grouped val split, best epoch): {metrics}.

Wall time {summary["wall_seconds"] / 60:.1f} min on {_machine_description(summary["environment"])}.
Curves: `curves.png`; per-epoch numbers: `history.csv`; everything else: `train.json`.

## Reproduce

```
{command}
```

## Limits

Small pretraining set (a few thousand images, public sources); the validation figures are a sanity check of the
pretraining, not diagnostic figures: what counts is the transfer (benchmarks/RESULTS.md).
{config.get("limits", "").strip()}
"""


def _data_tables(summary: Mapping[str, Any]) -> str:
    """Markdown tables of the training and validation images per source and per class."""
    sources = summary.get("sources", {})
    source_rows = [f"| {src} | {c.get('train', 0)} | {c.get('val', 0)} |" for src, c in sources.items()]
    data = summary["data"]
    labels = sorted({*data["train"], *data["val"]})
    class_rows = [f"| {c} | {data['train'].get(c, 0)} | {data['val'].get(c, 0)} |" for c in labels]
    header = ["| {} | train | val |", "|---|---|---|"]
    unused = summary["settings"].get("objective") == "contrastive"
    label = "label (not used by the label-free objective)" if unused else "class"
    return "\n".join(
        [header[0].format("source"), header[1], *source_rows, "", header[0].format(label), header[1], *class_rows]
    )


def _head_description(summary: Mapping[str, Any]) -> str:
    """What the `head` layer's outputs are, per objective."""
    objective = summary["settings"].get("objective", "softmax")
    if objective == "contrastive":
        return f"the {len(summary['classes'])}-wide linear projection of the label-free loss"
    if objective == "multitask":
        return f"{len(summary['classes'])} outputs, one slice per head below"
    return f"{len(summary['classes'])} logits, classes below"


def _objective_description(summary: Mapping[str, Any]) -> str:
    """The pretraining loss, in words."""
    settings = summary["settings"]
    objective = settings.get("objective", "softmax")
    if objective == "contrastive":
        return (
            f"Label-free: NT-Xent (SimCLR) at temperature {settings['temperature']} over two strongly augmented "
            "views of each image (no label used),"
        )
    if objective == "multitask":
        heads = "; ".join(f"`{h['name']}` ({_head_kind(h)})" for h in summary["heads"])
        return (
            f"One head per target: {heads}. Each head's loss (softmax cross-entropy, or squared error of the "
            "standardised number) is averaged over the rows that have its label; the heads' losses are summed,"
        )
    return "Softmax over the classes above with balanced class weights,"


def _head_kind(head: Mapping[str, Any]) -> str:
    if head["kind"] == "classes":
        return f"{len(head['classes'])} classes"
    return f"regression, mean {head['mean']:.1f}, sd {head['std']:.1f}"


def _machine_description(env: Mapping[str, Any]) -> str:
    """Platform, CPU cores, GPUs and TensorFlow / Keras versions of a `provenance.environment()` record."""
    versions = env.get("packages", env)  # train.json before 0.1.0 kept the versions at the top level
    return (
        f"{env['platform']}, {env['cpu_count']} CPU cores\n(shared), GPUs: {env.get('gpus') or 'none'}; "
        f"TensorFlow {versions['tensorflow']}, Keras {versions['keras']}"
    )


def _start_description(weights: str | None) -> str:
    if weights is None:
        return "random init"
    if weights == "imagenet":
        return "ImageNet (tlfusion/resources/imagenet, Apache-2.0: photographs, no radiographs)"
    return f"`{Path(weights).name}` from {Path(weights).parent.name}"


def _schedule_description(settings: Mapping[str, Any]) -> str:
    """The learning-rate phases and BatchNorm handling of a training run, in words."""
    warmup = settings.get("warmup_epochs", 0)
    unfrozen_rate = settings.get("unfrozen_learning_rate") or settings["learning_rate"]
    head = f"head alone for {warmup} epoch(s) at lr {settings['learning_rate']}, then " if warmup else ""
    trained = trains_batchnorm(settings.get("batchnorm", "auto"), settings.get("weights"))
    batchnorm = f"BatchNorm trained (momentum {TRAINED_BATCHNORM_MOMENTUM})" if trained else "BatchNorm frozen"
    return f"{head}every layer at lr {unfrozen_rate} ({batchnorm})"
