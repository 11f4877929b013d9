"""The benchmark helpers that need no data or model: RESULTS.md generation, fits, gains, process measurement."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import results_md
from benchmarks._common import measure_command
from benchmarks.accuracy import fusion_gain, init_gain, mean_deltas
from benchmarks.end_to_end import stage_timings
from benchmarks.scaling import linear_fit

MACHINE = {"processor": "x86_64", "cpu_count": 2, "load_average_1min": 1.5, "platform": "Linux", "python": "3.11"}


def scores(kappa: float, auroc: float) -> dict:
    return {"n": 10, "kappa": kappa, "f1": 0.5, "accuracy": 0.6, "auroc": auroc, "ci": {"kappa": [kappa - 0.1, 0.9]}}


def accuracy_run(init: str, fusion: float) -> dict:
    models = {"a/lr": scores(0.30, 0.70), "b/lr": scores(0.40, 0.65), "fusion/lr": scores(fusion, 0.72)}
    cv_scores = {"a/lr": 0.45, "b/lr": 0.35, "fusion/lr": 0.5}  # CV prefers a, the test split b
    run = {"experiment": "hand", "init": init, "seed": 0, "selected": "fusion/lr", "cv_scores": cv_scores}
    run["test_images_seen_in_pretraining"] = {"a": 0, "b": 0} if init == "in_domain" else {}
    return run | {"models": models}


def write(folder: Path, name: str, payload: dict | str) -> None:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    (folder / f"{name}.json").write_text(text)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    write(
        folder,
        "fewshot_speed",
        {
            "benchmark": "fewshot_speed",
            "machine": MACHINE,
            "settings": {"episodes": 100, "quick": True},
            "sampling": {"seconds": 0.1, "episodes_per_s": 1000.0},
            "classifiers": [{"classifier": "prototype", "seconds": 0.5, "episodes_per_s": 200.0, "auroc": 0.7}],
        },
    )
    write(
        folder,
        "made_up",
        {
            "machine": MACHINE,
            "notes": ["first note.", "second note."],
            "speed_s": 3.0,
            "accuracy": 0.8,
            "per_model": {"m1": {"kappa": 0.25, "test": {"auroc": 0.61}}, "m2": {"kappa": 0.35}},
            "targets": {"speed_s": 2.0, "accuracy": {"min": 0.75}, "absent": 1.0},
        },
    )
    runs = [accuracy_run("in_domain", 0.50), accuracy_run("scratch", 0.20)]
    write(
        folder,
        "accuracy",
        {
            "benchmark": "accuracy",
            "machine": MACHINE,
            "runs": runs,
            "fusion_minus_single": (gains := [g for run in runs for g in fusion_gain(run)]),
            "fusion_minus_cv_chosen_single_mean": mean_deltas(
                gains, ("experiment", "seed", "init"), "classifiers", "_vs_cv_chosen"
            ),
            "in_domain_minus_scratch": init_gain(runs),
            "in_domain_minus_scratch_mean": mean_deltas(init_gain(runs), ("experiment", "seed"), "models"),
            "in_domain_minus_scratch_mean_over_seeds": mean_deltas(init_gain(runs), ("experiment",), "models"),
            "missing": ["leg__scratch"],
        },
    )
    write(folder, "broken", "{not json")
    return folder


def test_results_md_has_a_section_and_table_per_file(results: Path, tmp_path: Path):
    out = results_md.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])
    text = out.read_text()
    for name in ("accuracy", "broken", "fewshot_speed", "made_up"):
        assert f"## {name}" in text
    assert "| prototype | 200 | 0.5 | 0.7 |" in text
    assert "python -m benchmarks.fewshot_speed --quick" in text
    assert "load average (1 min) 1.5" in text
    assert "| m1 | 0.25 | 0.61 |" in text  # generic fallback: a mapping of records becomes a table
    assert "could not read broken.json" in text
    assert "Notes: first note. second note." in text


def test_targets_report_met_not_met_and_unmeasured(results: Path):
    payload = json.loads((results / "made_up.json").read_text())
    rows = {row[0]: row for row in results_md.target_rows(payload)}
    assert rows["speed_s"][1:] == ["≤ 2", 3.0, "**not met**"]
    assert rows["accuracy"][1:] == ["≥ 0.75", 0.8, "met"]
    assert rows["absent"][3] == "not measured"


def test_accuracy_summary_tables(results: Path):
    text = results_md.section("accuracy", json.loads((results / "accuracy.json").read_text()))
    assert "| hand | 0 | in_domain | lr | 0.5 | 0.3 | a | 0.2 | 0.02 |" in text  # against the single chosen on CV
    assert "| hand | 0 | in_domain | lr | 0.5 | 0.4 | b | 0.1 | 0.02 |" in text  # against the best single on test
    assert "| hand | 0 | scratch | 1 | -0.1 | 0 | 0.02 | 1 |" in text
    assert "| hand | 0 | fusion/lr | 0.3 | 0 |" in text
    assert "| hand | 0 | 3 | 0.1 | 1 | 0 | 0 |" in text  # per seed
    assert "| hand | 3 | 0.1 | 1 | 0 | 0 |" in text  # over seeds
    assert "leg__scratch" in text


def test_empty_results_folder(tmp_path: Path):
    assert "No result files yet" in results_md.render(results_md.load_results(tmp_path))


def test_fusion_gain_compares_with_the_best_single_backbone_per_metric():
    (gain,) = fusion_gain(accuracy_run("in_domain", 0.35))
    assert gain["best_single_kappa_backbone"] == "b" and gain["delta_kappa"] == pytest.approx(-0.05)
    assert gain["best_single_auroc_backbone"] == "a" and gain["delta_auroc"] == pytest.approx(0.02)


def test_fusion_gain_also_compares_with_the_single_backbone_chosen_on_cv():
    (gain,) = fusion_gain(accuracy_run("in_domain", 0.35))
    assert gain["cv_chosen_single"] == "a"
    assert gain["delta_kappa_vs_cv_chosen"] == pytest.approx(0.05)
    assert gain["delta_auroc_vs_cv_chosen"] == pytest.approx(0.02)
    (summary,) = mean_deltas([gain], ("experiment", "seed", "init"), "classifiers", "_vs_cv_chosen")
    assert summary["positive_delta_kappa_vs_cv_chosen"] == 1


def test_stage_timings_read_computed_and_skipped_stages_from_run_log():
    log = (
        "2026-11-23 16:41:11,937 INFO stage data ...\n"
        "2026-11-23 16:41:14,790 INFO stage data done in 2.9 s\n"
        "2026-11-23 16:41:14,795 INFO stage finetune unchanged, skipped\n"
        "2026-11-23 16:41:20,001 INFO stage extract done in 35.3 s\n"
    )
    assert stage_timings(log) == {"data": 2.9, "finetune": "skipped", "extract": 35.3}


def test_linear_fit_recovers_slope_and_intercept():
    fit = linear_fit([250, 500, 1000, 2000], [7.5 + 0.02 * n for n in (250, 500, 1000, 2000)])
    assert fit == {"slope_s_per_image": pytest.approx(0.02), "intercept_s": pytest.approx(7.5), "r2": 1.0}


def test_measure_command_reports_exit_code_and_memory():
    measured = measure_command([sys.executable, "-c", "import sys; b = bytearray(64 * 2**20); sys.exit(3)"])
    assert measured["returncode"] == 3
    assert measured["peak_rss_mib"] >= 64


def test_in_domain_minus_scratch_pairs_runs_of_the_same_seed():
    runs = [accuracy_run("in_domain", 0.50), accuracy_run("scratch", 0.20)]
    runs += [run | {"seed": 1} for run in (accuracy_run("in_domain", 0.40), accuracy_run("scratch", 0.35))]
    gains = {(g["seed"], g["model"]): g["delta_kappa"] for g in init_gain(runs)}
    assert gains[(0, "fusion/lr")] == pytest.approx(0.30) and gains[(1, "fusion/lr")] == pytest.approx(0.05)
    (over_seeds,) = mean_deltas(init_gain(runs), ("experiment",), "models")
    assert over_seeds["models"] == 6 and over_seeds["positive_delta_kappa"] == 2
