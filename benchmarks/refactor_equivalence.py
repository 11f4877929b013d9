"""Did the issue-17 redesign change any result? Shipped experiments run with the code before it and at HEAD.

Each shipped experiment that runs on ../shared/data is run with the code of a commit before the redesign (`--base`,
default 8d2528c) and with this checkout's HEAD, and every number both runs write is compared.

    python -m benchmarks.refactor_equivalence [--base 8d2528c] [--experiments demo fracatlas_leg ...]

Each side is a git worktree of its commit under runs/benchmarks/equivalence/ (`base_src`, `head_src`: edits to this
checkout while it runs change nothing), run as `python -P -m tlfusion run experiments/NAME.yaml --out
runs/benchmarks/equivalence/SIDE/NAME --set explain.enabled=false` with that worktree as PYTHONPATH (`-P`: this
checkout's own tlfusion/, in the working directory, must not shadow it; checked before any run); both read HEAD's
experiment files (explanations change no score). The two sides of an experiment run at the same time. A finished run
is re-used: the pipeline skips its stages. The result file is rewritten after each experiment.

Compared (`compare_files`): the data split (data/table.csv), the fine-tuning histories (backbones/*/history.csv),
the features (features/*.npy), the selection (fit/selection.json: model, CV scores, thresholds), the out-of-fold
and test probabilities (fit/predictions.csv), metrics.json, and the few-shot results (fewshot.json,
fewshot_curve.json). JSON files are flattened to leaves (rows of a list keyed by their text fields); a leaf counts
as differing when it is missing on one side, its text differs, or its number differs by more than `TOLERANCE`.
Text is compared after `RENAMED` maps the base side's module paths that the package layout (issue 28) moved to their
new names: a note such as fewshot.json's interval description names the module that computed it.
Writes benchmarks/results/refactor_equivalence.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import REPO, git, machine_info, measure_command, write_result

OUT = REPO / "runs" / "benchmarks" / "equivalence"
EXPERIMENTS = ("demo", "fewshot_covid", "nih1000", "fracatlas_leg", "kermany_pneumonia")
"""The shipped experiments whose data is in ../shared/data (fracatlas_hand: benchmarks/accuracy at 25300a9)."""
BASE = "8d2528c"
"""The last commit before the issue-17 redesign began (9e08d90 moved the feature runner cache)."""
TOLERANCE = 1e-9
JSON_FILES = ("fit/selection.json", "metrics.json", "fewshot.json", "fewshot_curve.json")
RENAMED = {
    "tlfusion.multilabel_training": "tlfusion.training.multilabel",
    "tlfusion.pretraining_config": "tlfusion.config.pretraining",
    "tlfusion.pretraining_losses": "tlfusion.training.pretraining_losses",
    "tlfusion.pretraining_heads": "tlfusion.training.pretraining_heads",
    "tlfusion.fewshot_intervals": "tlfusion.fewshot.intervals",
    "tlfusion.training_records": "tlfusion.training.records",
    "tlfusion.label_embeddings": "tlfusion.semantic.label_embeddings",
    "tlfusion.feature_runners": "tlfusion.features.runners",
    "tlfusion.estimator_files": "tlfusion.bundle.estimator_files",
    "tlfusion.cluster_predict": "tlfusion.bundle.cluster_predict",
    "tlfusion.tflite_weights": "tlfusion.backbones.tflite",
    "tlfusion.metrics_schema": "tlfusion.evaluation.schema",
    "tlfusion.feature_cache": "tlfusion.features.cache",
    "tlfusion.class_metrics": "tlfusion.evaluation.class_metrics",
    "tlfusion.semantic_eval": "tlfusion.semantic.evaluation",
    "tlfusion.pretraining": "tlfusion.training.pretraining",
    "tlfusion.model_cards": "tlfusion.training.model_cards",
    "tlfusion.onnx_graphs": "tlfusion.features.onnx_graphs",
    "tlfusion.classifiers": "tlfusion.models.classifiers",
    "tlfusion.calibration": "tlfusion.evaluation.calibration",
    "tlfusion.stage_code": "tlfusion.run.code_keys",
    "tlfusion.provenance": "tlfusion.training.provenance",
    "tlfusion.model_name": "tlfusion.models.names",
    "tlfusion.evaluation": "tlfusion.evaluation.results",
    "tlfusion.run_paths": "tlfusion.run.paths",
    "tlfusion.backbones": "tlfusion.backbones.registry",
    "tlfusion.subgroups": "tlfusion.evaluation.subgroups",
    "tlfusion.runfiles": "tlfusion.run.readers",
    "tlfusion.tracking": "tlfusion.reports.tracking",
    "tlfusion.imagenet": "tlfusion.backbones.imagenet",
    "tlfusion.training": "tlfusion.training.finetune",
    "tlfusion.strategy": "tlfusion.training.distribution",
    "tlfusion.features": "tlfusion.features.extraction",
    "tlfusion.episodes": "tlfusion.fewshot.episodes",
    "tlfusion.semantic": "tlfusion.semantic.metric_learning",
    "tlfusion.cluster": "tlfusion.features.cluster",
    "tlfusion.signing": "tlfusion.bundle.signing",
    "tlfusion.metrics": "tlfusion.evaluation.metrics",
    "tlfusion.fewshot": "tlfusion.fewshot.evaluation",
    "tlfusion.config": "tlfusion.config.experiment",
    "tlfusion.bundle": "tlfusion.bundle.folder",
    "tlfusion.names": "tlfusion.config.names",
    "tlfusion.ood": "tlfusion.bundle.ood",
}
"""Module paths before the package layout (issue 28) -> after, longest first; applied to the base side's text."""
RENAMED_PATTERN = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, RENAMED)) + r")(?![\w])")
SHOWN = 12
"""Differing leaves listed per file (all are counted)."""


def worktree(side: str, commit: str) -> Path:
    """A git worktree of `commit` at runs/benchmarks/equivalence/<side>_src (re-made if it holds another commit)."""
    folder = OUT / f"{side}_src"
    if folder.exists() and git("-C", str(folder), "rev-parse", "HEAD") != commit:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], check=True)
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), commit], check=True)
    return folder


def side_command(source: Path, *arguments: str) -> tuple[list[str], dict[str, str]]:
    """A Python command line and environment that import tlfusion from `source` only: `-P` keeps the working
    directory (this checkout, whose own tlfusion/ would shadow `source`) off `sys.path`."""
    return [sys.executable, "-P", *arguments], {**os.environ, "PYTHONPATH": str(source)}


def check_imported_from(source: Path) -> None:
    """Refuse to compare when a side's tlfusion would not come from its worktree."""
    command, env = side_command(source, "-c", "import tlfusion; print(tlfusion.__file__)")
    found = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(source.resolve()):
        raise SystemExit(f"tlfusion imports from {found}, not from {source}")


def run(source: Path, name: str, out: Path) -> dict:
    """`tlfusion run` of experiment `name` with the code in `source`; its console output in `out`.out. Paths are
    given relative to the repository, so a run started by hand with the same command line is re-used."""
    command, env = side_command(source, "-m", "tlfusion", "run", f"experiments/{name}.yaml")
    command += ["--out", str(out.relative_to(REPO)), "--set", "explain.enabled=false"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.out", "a") as log:
        return measure_command(command, cwd=REPO, env=env, stdout=log, stderr=log)


def leaves(value, prefix: str = "") -> dict[str, object]:
    """A JSON value flattened to `path -> scalar`; a list of objects is keyed by each row's text fields."""
    if isinstance(value, dict):
        return {key: leaf for name, item in value.items() for key, leaf in leaves(item, f"{prefix}/{name}").items()}
    if isinstance(value, list):
        found = {}
        for index, item in enumerate(value):
            label = (
                "|".join(f"{k}={v}" for k, v in item.items() if isinstance(v, str)) if isinstance(item, dict) else ""
            )
            found.update(leaves(item, f"{prefix}[{label or index}]"))
        return found
    return {prefix: value}


def renamed(value: object) -> object:
    """`value` with the module paths in it (text only) under their names after the package layout."""
    return RENAMED_PATTERN.sub(lambda match: RENAMED[match.group(1)], value) if isinstance(value, str) else value


def differing(a: dict[str, object], b: dict[str, object]) -> list[str]:
    """The leaves of base `a` and head `b` that differ: missing on one side, other text (the base's module paths
    `renamed`), or numbers beyond `TOLERANCE`."""
    found = []
    for key in sorted(a.keys() | b.keys()):
        x, y = renamed(a.get(key, "<missing>")), b.get(key, "<missing>")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
        if (abs(x - y) > TOLERANCE) if numbers else (x != y):
            found.append(f"{key}: {x} vs {y}")
    return found


def file_leaves(path: Path) -> dict[str, object]:
    """A JSON file's `leaves`, or a CSV as `row/column -> value` (rows by position); {} for a missing file."""
    if not path.exists():
        return {}
    if path.suffix == ".json":
        return leaves(json.loads(path.read_text()))
    records = pd.read_csv(path, keep_default_na=False).to_dict("records")
    return {f"{row}/{column}": value for row, record in enumerate(records) for column, value in record.items()}


def compare_files(base: Path, head: Path) -> dict:
    """Every compared file of one experiment: how many leaves differ, the first `SHOWN`, and features' max gap."""
    histories = sorted(str(path.relative_to(base)) for path in base.glob("backbones/*/history.csv"))
    files: dict[str, dict] = {}
    for relative in (*JSON_FILES, "data/table.csv", "fit/predictions.csv", *histories):
        if (base / relative).exists() or (head / relative).exists():
            found = differing(file_leaves(base / relative), file_leaves(head / relative))
            files[relative] = {"differing": len(found), "first": found[:SHOWN]}
    for path in sorted(base.glob("features/*.npy")):
        a, b = np.load(path), np.load(head / path.relative_to(base))
        gap = float(np.abs(a - b).max()) if a.shape == b.shape else None
        files[str(path.relative_to(base))] = {"shape": list(a.shape), "max_abs_difference": gap}
    return files


def outcome(folder: Path) -> dict:
    """What a reader looks at first: the selected model (binary or multi-label) and the few-shot mean AUROC."""
    found = {}
    if (folder / "metrics.json").exists():
        found["selected"] = json.loads((folder / "metrics.json").read_text()).get("selected")
    if (folder / "fewshot.json").exists():
        found["fewshot_auroc"] = json.loads((folder / "fewshot.json").read_text())["auroc"]["mean"]
    return found


def probability_gaps(base: Path, head: Path) -> dict[str, float]:
    """Largest |base - head| probability per split of fit/predictions.csv (cv: out of fold; test)."""
    if not (base / "fit/predictions.csv").exists():
        return {}
    a, b = (pd.read_csv(folder / "fit/predictions.csv") for folder in (base, head))
    return (a["prob"] - b["prob"]).abs().groupby(a["split"]).max().round(6).to_dict()


def same_file(entry: dict) -> bool:
    """No differing leaf, or features of the same shape within `TOLERANCE`."""
    if "differing" in entry:
        return entry["differing"] == 0
    return entry["max_abs_difference"] is not None and entry["max_abs_difference"] <= TOLERANCE


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    args = parser.parse_args(argv)
    machine = machine_info("tensorflow-cpu", "keras", "scikit-learn", "xgboost", "numpy")
    commits = {"base": git("rev-parse", args.base), "head": git("rev-parse", "HEAD")}
    sources = {side: worktree(side, commit) for side, commit in commits.items()}
    for source in sources.values():
        check_imported_from(source)
    payload = {
        "benchmark": "refactor_equivalence",
        "machine": machine,
        "settings": {
            "commits": commits,
            "tolerance": TOLERANCE,
            "overrides": ["explain.enabled=false"],
            "renamed_modules": len(RENAMED),
        },
        "experiments": {},
    }
    for name in args.experiments:
        with ThreadPoolExecutor(len(sources)) as pool:  # both sides at once: their timings share the CPUs
            started = {side: pool.submit(run, source, name, OUT / side / name) for side, source in sources.items()}
            runs = {side: future.result() for side, future in started.items()}
        base, head = OUT / "base" / name, OUT / "head" / name
        files = compare_files(base, head)
        same = all(same_file(entry) for entry in files.values())
        outcomes = {"base": outcome(base), "head": outcome(head)}
        payload["experiments"][name] = {"identical": same, "outcome": outcomes}
        payload["experiments"][name] |= {"probability_gaps": probability_gaps(base, head), "runs": runs, "files": files}
        print(name, "identical" if same else "DIFFERS", json.dumps(runs), flush=True)
        print("written", write_result("refactor_equivalence", payload))  # after each experiment: partial runs count
    return payload


if __name__ == "__main__":
    main()
