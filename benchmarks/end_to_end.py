"""End to end: wall time and peak memory of `tlfusion demo` and of a full FracAtlas hand experiment, cold and re-run.

    python -m benchmarks.end_to_end [--quick] [--keep DIR]

Each scenario runs the `tlfusion` command in a subprocess twice on the same run folder: cold (a fresh, empty run
folder: fine-tuning, extraction, classifiers, evaluation, explanations and reports all computed) and again
unchanged (every stage but `data` is skipped; features come from the run folder's cache). Recorded: wall
seconds, the peak RSS of the largest process (`wait4` rusage) and of the whole process tree (polled /proc,
0.25 s), each stage's seconds (or "skipped") from the lines this invocation added to the run's run.log, the
selected model and its test-split scores, and the
load average before and after. Scenarios: `demo` (the bundled sample, target < 180 s) and `fracatlas_hand_224`
(`tlfusion run experiments/fracatlas_hand.yaml --set image.size=224`: two shipped in-domain backbones,
fine-tuned, five classifiers + vote, 8 explained cases) and `mura_humerus_size` (experiments/mura_humerus.yaml as
shipped, its data swapped for all of FracAtlas with a 30 % test part: 1282 train+val images, MURA humerus has 1272;
targets <= 45 min and <= 8 GiB); `--quick` runs the demo only (into end_to_end_quick.json), `--scenarios` picks.
One run each (no repeats: a cold run takes minutes). Writes benchmarks/results/end_to_end.json.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from benchmarks._common import load_average, machine_info, measure_command, write_result
from tlfusion.run.paths import RunPaths

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = {
    "demo": ["tlfusion", "demo"],
    "fracatlas_hand_224": ["tlfusion", "run", "experiments/fracatlas_hand.yaml", "--set", "image.size=224"],
    # MURA itself is not redistributable: experiments/mura_humerus.yaml unchanged (224 px, two backbones, 8 epochs,
    # 12 explained cases) on all of FracAtlas with a 30 % test part: 1282 train+val images (MURA humerus: 1272).
    "mura_humerus_size": [
        "tlfusion",
        "run",
        "experiments/mura_humerus.yaml",
        "--set",
        "data={format: csv, root: ../../shared/data/fracatlas, csv: dataset.csv, label_column: fractured}",
        "--set",
        "split={test_fraction: 0.3, val_fraction: 0.2}",
        "--set",
        "positive_class='1'",
        "--set",
        "evaluate={}",
    ],
}
TARGETS = {
    "demo_cold_wall_s": {"max": 180},
    "demo_second_run_wall_s": {"max": 30},
    "fracatlas_hand_224_second_run_wall_s": {"max": 30},
    "mura_humerus_size_cold_wall_s": {"max": 2700},
    "mura_humerus_size_cold_peak_tree_rss_mib": {"max": 8192},
}
STAGE_LINE = re.compile(r"stage (\w+) (?:done in ([\d.]+) s|unchanged, skipped)")
PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "onnxruntime", "scikit-learn", "xgboost", "lime", "numpy")


def run_once(command: list[str], run_dir: Path) -> dict:
    """One measured invocation of ``command --out run_dir``, with its stage timings and the selected scores."""
    before = load_average()
    run_log = RunPaths(run_dir).log
    offset = run_log.stat().st_size if run_log.is_file() else 0
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
        measured = measure_command([*command, "--out", str(run_dir)], cwd=REPO, stdout=log, stderr=log)
    with open(run_log, "rb") as lines:
        lines.seek(offset)
        timings = stage_timings(lines.read().decode(errors="replace"))
    return {
        **measured,
        "load_average_before": before,
        "load_average_after": load_average(),
        "stage_timings_s": timings,
        **run_summary(run_dir),
    }


def stage_timings(log_text: str) -> dict[str, float | str]:
    """Each stage's seconds, or "skipped" when it was unchanged, from run.log lines."""
    return {match[1]: float(match[2]) if match[2] else "skipped" for match in STAGE_LINE.finditer(log_text)}


def run_summary(run_dir: Path) -> dict:
    """The selected model and its image-level test scores (binary or K-class keys) from ``run_dir/metrics.json``."""
    path = RunPaths(run_dir).metrics
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    selected = metrics.get("selected")
    test = [
        row
        for row in metrics.get("results", [])
        if row["model"] == selected and row["split"] == "test" and row["level"] == "image"
    ]
    keys = ("n", "kappa", "auroc", "f1", "accuracy", "quadratic_kappa", "macro_auroc")
    scores = {key: test[0][key] for key in keys if test and key in test[0]}
    return {"selected": selected, "test": scores}


def scenario(name: str, root: Path) -> dict:
    """Cold run into a fresh folder, then the unchanged re-run."""
    run_dir = root / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir} is not empty: a cold run needs a fresh run folder")
    cold = run_once(SCENARIOS[name], run_dir)
    print(name, "cold", {k: cold[k] for k in ("wall_s", "peak_rss_mib", "peak_tree_rss_mib", "returncode")}, flush=True)
    second = run_once(SCENARIOS[name], run_dir)
    print(name, "second", {k: second[k] for k in ("wall_s", "peak_rss_mib", "returncode")}, flush=True)
    return {"command": " ".join([*SCENARIOS[name], "--out", "DIR"]), "cold": cold, "second_run": second}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo only")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, help="default: all")
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a deleted temporary folder)")
    args = parser.parse_args(argv)
    names = ["demo"] if args.quick else args.scenarios or list(SCENARIOS)
    machine = machine_info(*PACKAGES)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        scenarios = {name: scenario(name, root) for name in names}
    machine["load_average_1min_after"] = load_average()[0]
    payload = {
        "benchmark": "end_to_end",
        "machine": machine,
        "settings": {
            "quick": args.quick,
            "scenarios": {name: scenarios[name]["command"] for name in names},
            "runs": "one cold run into a fresh run folder, then one unchanged re-run of the same folder",
            "memory": "peak RSS of the largest process (wait4) and of the process tree (polled /proc)",
        },
        "scenarios": scenarios,
        "targets": {name: target for name, target in TARGETS.items() if name.startswith(tuple(names))},
    }
    print("results:", write_result("end_to_end_quick" if args.quick else "end_to_end", payload))
    return payload


if __name__ == "__main__":
    main()
