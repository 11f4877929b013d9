"""Knee KL fine-tuning head on validation only: a K-way softmax vs K-1 cumulative (ordinal) logits, same recipe.

    python -m benchmarks.knee_head_screen [--root DIR] [--backbone mobilenetv2]

For each head, `tlfusion run experiments/knee_kl.yaml` with `finetune.head` set, one backbone (the shipped
in-domain start), `lr` only and explanations off, into a fresh run folder; then the fine-tuned network itself
(backbone + head, `backbones/<key>/model.keras`) predicts the run's validation part (the grouped 15% of the
training split that early stopping watched; never the test split). Softmax logits become class probabilities by
softmax; ordinal logits give P(grade > k) by a sigmoid, class probabilities by successive differences (made
monotone first). Both heads are scored on the same validation knees: quadratic kappa, accuracy, macro AUROC, the
cut-point AUROCs, and ordinal minus softmax with a paired subject-bootstrap interval. Which head the knee
experiment ships is decided here, on validation. Writes benchmarks/results/knee_head_screen.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import REPO, machine_info, write_result
from benchmarks.end_to_end import run_once
from tlfusion.backbones.registry import load_model_file
from tlfusion.data.images import load_batch
from tlfusion.evaluation.class_metrics import class_metrics, cut_aurocs, paired_class_delta
from tlfusion.run.paths import RunPaths

HEADS = ("softmax", "ordinal")
CLASSES = ["0", "1", "2", "3", "4"]
IMAGE_SIZE = 160
WEIGHTS = {"mobilenet": "mobilenet_imagenet_msk", "mobilenetv2": "mobilenetv2_imagenet_msk"}
SCORES = ("quadratic_kappa", "accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")
PACKAGES = ("tensorflow-cpu", "keras", "scikit-learn", "numpy")


def softmax_probabilities(logits: np.ndarray) -> np.ndarray:
    """[n, K] class probabilities of K softmax logits."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def ordinal_probabilities(logits: np.ndarray) -> np.ndarray:
    """[n, K] class probabilities of K-1 cumulative logits (column k: P(grade > k)), made monotone first."""
    above = np.minimum.accumulate(1.0 / (1.0 + np.exp(-logits)), axis=1)
    bounds = np.hstack([np.ones((len(logits), 1)), above, np.zeros((len(logits), 1))])
    return bounds[:, :-1] - bounds[:, 1:]


TO_PROBABILITIES = {"softmax": softmax_probabilities, "ordinal": ordinal_probabilities}


def run_head(head: str, backbone: str, root: Path) -> tuple[dict, Path]:
    """One cold knee_kl run with `head`; its wall time and run folder."""
    run_dir = root / head
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir} is not empty: a cold run needs a fresh run folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = f"../saved_models/{WEIGHTS[backbone]}/model.keras"
    command = ["tlfusion", "run", "experiments/knee_kl.yaml", "--set", f"finetune.head={head}"]
    command += ["--set", f"backbones=[{{name: {backbone}, weights: {weights}}}]"]
    command += ["--set", "classifiers.models=[lr]", "--set", "explain.enabled=false"]
    measured = run_once(command, run_dir)
    if measured["returncode"] != 0:
        raise SystemExit(f"{' '.join(command)} exited {measured['returncode']}; see {run_dir}.log")
    return {"command": " ".join([*command, "--out", "DIR"]), "wall_s": measured["wall_s"]}, run_dir


def validation_probabilities(run_dir: Path, backbone: str, head: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The run's validation rows and the fine-tuned network's [n, K] class probabilities on them."""
    paths = RunPaths(run_dir)
    val = pd.read_csv(paths.table, dtype={"label": str}).query("split == 'val'").reset_index(drop=True)
    model = load_model_file(paths.model(backbone))
    logits = model.predict(load_batch(list(val["path"]), IMAGE_SIZE), batch_size=64, verbose=0)
    return val, TO_PROBABILITIES[head](np.asarray(logits, np.float64))


def scores(y: np.ndarray, prob: np.ndarray) -> dict:
    """The screen's scores of one head on the validation knees."""
    metrics = class_metrics(y, prob, CLASSES)
    cuts = {f"auroc_ge_{cut['cut']}": cut["auroc"] for cut in cut_aurocs(y, prob, CLASSES)}
    return {key: metrics[key] for key in SCORES} | cuts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "benchmarks" / "knee_head_screen")
    parser.add_argument("--backbone", choices=sorted(WEIGHTS), default="mobilenetv2")
    args = parser.parse_args(argv)
    machine, runs, probabilities = machine_info(*PACKAGES), {}, {}
    for head in HEADS:
        runs[head], run_dir = run_head(head, args.backbone, args.root)
        val, probabilities[head] = validation_probabilities(run_dir, args.backbone, head)
        y = val["label"].map(CLASSES.index).to_numpy()
        runs[head]["val"] = scores(y, probabilities[head])
        print(head, runs[head], flush=True)
    delta = paired_class_delta(y, probabilities["ordinal"], probabilities["softmax"], val["patient"].to_numpy())
    chosen = max(HEADS, key=lambda head: runs[head]["val"]["quadratic_kappa"])
    payload = {
        "benchmark": "knee_head_screen",
        "machine": machine,
        "settings": {"backbone": args.backbone, "image_size": IMAGE_SIZE, "val_knees": len(val)},
        "heads": runs,
        "ordinal_minus_softmax": delta,
        "chosen_on_val_quadratic_kappa": chosen,
    }
    print(f"wrote {write_result('knee_head_screen', payload)}")
    return payload


if __name__ == "__main__":
    main()
