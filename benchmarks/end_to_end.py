"""End to end: wall time and peak memory of `tlfusion demo` and of a full FracAtlas hand experiment, cold and re-run.

    python -m benchmarks.end_to_end [--quick] [--keep DIR]

Each scenario runs the `tlfusion` command in a subprocess twice on the same run folder: cold (a fresh, empty run
folder: fine-tuning, extraction, classifiers, evaluation, explanations and reports all computed) and again
unchanged (every stage but `data` is skipped; features come from the run folder's cache). Recorded: wall
seconds, the peak RSS of the largest process (`wait4` rusage) and of the whole process tree (polled /proc,
0.25 s), the stage timings from the run's metrics.json, the selected model and its test-split scores, and the
load average before and after. Scenarios: `demo` (the bundled sample, target < 180 s) and `fracatlas_hand_224`
(`tlfusion run experiments/fracatlas_hand.yaml --set image.size=224`: two shipped in-domain backbones,
fine-tuned, five classifiers + vote, 8 explained cases); `--quick` runs the demo only.
One run each (no repeats: a cold run takes minutes). Writes benchmarks/results/end_to_end.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks._common import load_average, machine_info, measure_command, write_result

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = {
    "demo": ["tlfusion", "demo"],
    "fracatlas_hand_224": ["tlfusion", "run", "experiments/fracatlas_hand.yaml", "--set", "image.size=224"],
}
PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "onnxruntime", "scikit-learn", "xgboost", "lime", "numpy")


def run_once(command: list[str], run_dir: Path) -> dict:
    """One measured invocation of ``command --out run_dir``, with the run's stage timings and selected scores."""
    before = load_average()
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
        measured = measure_command([*command, "--out", str(run_dir)], cwd=REPO, stdout=log, stderr=log)
    return {**measured, "load_average_before": before, "load_average_after": load_average(), **run_summary(run_dir)}


def run_summary(run_dir: Path) -> dict:
    """Stage timings, the selected model and its image-level test scores from ``run_dir/metrics.json``."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    selected = metrics.get("selected")
    test = [
        row
        for row in metrics.get("results", [])
        if row["model"] == selected and row["split"] == "test" and row["level"] == "image"
    ]
    scores = {key: test[0][key] for key in ("n", "kappa", "auroc", "f1", "accuracy")} if test else {}
    return {"stage_timings_s": metrics.get("timings", {}), "selected": selected, "test": scores}


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
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a deleted temporary folder)")
    args = parser.parse_args(argv)
    names = ["demo"] if args.quick else list(SCENARIOS)
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
        "targets": {"demo_cold_wall_s": {"max": 180}, "demo_second_run_wall_s": {"max": 30}},
    }
    print("results:", write_result("end_to_end", payload))
    return payload


if __name__ == "__main__":
    main()
