"""The benchmark helpers that need no data or model: RESULTS.md generation, fits, gains, process measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import _common, results_md
from benchmarks._common import git_state, measure_command, write_result
from benchmarks.accuracy import fusion_gain, init_gain, mean_deltas, overrides, reused_backbones, selected_means
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


PAIRED_ROW = {
    "comparison": "in_domain - scratch",
    "experiment": "hand",
    "seed": 0,
    "n": 10,
    "models": ["fusion/lr", "a/lr"],
    "kappa": {"delta": 0.25, "ci": [-0.05, 0.5]},
    "auroc": {"delta": 0.04, "ci": [0.01, 0.08]},
}
PRETRAIN_SCREEN = {
    "benchmark": "pretrain_screen",
    "machine": MACHINE,
    "candidates": {
        "imagenet": {
            "backbones": ["mobilenet"],
            "hand_seed0": {"mobilenet": {"n_train": 80, "n_val": 20, "auroc": 0.8, "kappa": 0.4}},
            "knee": {"mobilenet": {"n": 50, "qwk": 0.6, "accuracy": 0.5}},
        },
        "absent_family": {"missing": True},
    },
}


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
            "selected_mean_over_seeds": selected_means(runs),
            "init_comparisons": (inits := init_gain(runs, "in_domain", "scratch")),
            "init_comparisons_mean": mean_deltas(inits, ("comparison", "experiment", "seed"), "models"),
            "init_comparisons_mean_over_seeds": mean_deltas(inits, ("comparison", "experiment"), "models"),
            "init_selected_paired": [PAIRED_ROW],
            "missing": ["leg__scratch"],
        },
    )
    write(folder, "pretrain_screen", PRETRAIN_SCREEN)
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
    assert "| in_domain - scratch | hand | 0 | fusion/lr | 0.3 | 0 |" in text
    assert "| in_domain - scratch | hand | 0 | 3 | 0.1 | 1 | 0 | 0 |" in text  # per seed
    assert "| in_domain - scratch | hand | 3 | 0.1 | 1 | 0 | 0 |" in text  # over seeds
    assert "| hand | in_domain | 1 | 0.5 | 0.72 |" in text  # the selected model, mean over seeds
    assert "leg__scratch" in text
    assert "| in_domain - scratch | hand | 0 | 10 | fusion/lr vs a/lr | 0.25 [-0.05, 0.5] | 0.04 [0.01, 0.08] |" in text


def test_pretrain_screen_summary_table(results: Path):
    text = results_md.section("pretrain_screen", json.loads((results / "pretrain_screen.json").read_text()))
    assert "| imagenet | hand_seed0 | mobilenet | 80 | 20 | – | 0.8 | 0.4 | – | – |" in text
    assert "| imagenet | knee | mobilenet | – | – | 50 | – | – | 0.6 | 0.5 |" in text
    assert "absent_family" not in text.split("**frozen features")[1]


def multiclass_entry(commit: str) -> dict:
    """One experiment of benchmarks/results/multiclass.json, with made-up numbers."""
    value = {"value": 0.7, "ci": [0.6, 0.8]}
    cls = {"class": "0", "n": 5, "sensitivity": 0.5, "specificity": 0.9, "f1": 0.6, "auroc": 0.8, "ci": {}}
    delta = {"delta": 0.01, "ci": [-0.02, 0.04]}
    return {
        "run": {"wall_s": 60.0, "peak_tree_rss_mib": 900.0},
        "selected": "fusion/lr",
        "selection": {"cv_scores": {"fusion/lr": 0.75}},
        "test_n": 10,
        "test": dict.fromkeys(results_md.MULTICLASS_HEADLINE, value),
        "test_per_class": [cls],
        "test_cut_auroc": [{"cut": "2", "positives": 4, "auroc": 0.9, "ci": [0.8, 1.0]}],
        "fusion_vs_single": [{"fusion": "fusion/lr", "single": "a/lr", "quadratic_kappa": delta, "macro_auroc": delta}],
        "targets": {"test_accuracy": {"value": 0.7, "target": {"min": 0.67}, "met": True}},
        "machine": {"git": {"commit": commit, "dirty": False, "dirty_paths": []}},
    }


def test_multiclass_summary_rows_carry_their_own_commit(monkeypatch):
    monkeypatch.setattr(results_md, "head_commit", lambda: "a" * 40)
    monkeypatch.setattr(results_md, "same_code_as_head", lambda commit: False)
    payload = {"experiments": {"knee": multiclass_entry("a" * 40), "chest": multiclass_entry("b" * 40)}}
    tables = results_md.summarise_multiclass(payload)
    text = "\n".join(results_md.markdown_table(header, rows) for _, header, rows in tables)
    assert "| knee | 60 | 900 | fusion/lr | 0.75 | 10 | 0.7 [0.6, 0.8] |" in text
    assert "| knee | >= 2 | 4 | 0.9 [0.8, 1] | aaaaaaa (HEAD) |" in text
    assert "| chest | test_accuracy | ≥ 0.67 | 0.7 | met | bbbbbbb (not HEAD) |" in text


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


def test_init_comparison_pairs_runs_of_the_same_seed():
    runs = [accuracy_run("in_domain", 0.50), accuracy_run("scratch", 0.20)]
    runs += [run | {"seed": 1} for run in (accuracy_run("in_domain", 0.40), accuracy_run("scratch", 0.35))]
    gains = {(g["seed"], g["model"]): g["delta_kappa"] for g in init_gain(runs, "in_domain", "scratch")}
    assert gains[(0, "fusion/lr")] == pytest.approx(0.30) and gains[(1, "fusion/lr")] == pytest.approx(0.05)
    (over_seeds,) = mean_deltas(init_gain(runs, "in_domain", "scratch"), ("experiment",), "models")
    assert over_seeds["models"] == 6 and over_seeds["positive_delta_kappa"] == 2
    assert init_gain(runs, "scratch", "in_domain")[0]["delta_kappa"] == pytest.approx(0.0)  # a/lr equal in both
    (selected,) = selected_means([runs[0], runs[2]])  # in_domain at seeds 0 and 1, fusion/lr selected
    assert selected["seeds"] == [0, 1] and selected["mean_kappa"] == pytest.approx(0.45)


HEAD, SAME_CODE, OLD = "a" * 40, "b" * 40, "c" * 40


@pytest.fixture
def fake_head(monkeypatch):
    monkeypatch.setattr(results_md, "head_commit", lambda: HEAD)
    monkeypatch.setattr(results_md, "same_code_as_head", lambda commit: commit == SAME_CODE)


def git_repo(folder: Path, monkeypatch) -> callable:
    """An empty git repository the benchmark helpers read; returns a `git ARGS` runner for it."""
    folder.mkdir()
    monkeypatch.setattr(_common, "REPO", folder)

    def run(*args: str) -> str:
        command = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()

    run("init", "-q")
    return run


def commit_file(run, folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    run("add", name)
    run("commit", "-q", "-m", name)
    return run("rev-parse", "HEAD")


def test_git_state_records_the_commit_and_uncommitted_changes(tmp_path, monkeypatch):
    assert (
        git_state()["commit"]
        == subprocess.check_output(["git", "-C", str(_common.REPO), "rev-parse", "HEAD"], text=True).strip()
    )
    run = git_repo(tmp_path / "repo", monkeypatch)
    commit = commit_file(run, tmp_path / "repo", "code.py", "x = 1\n")
    assert git_state() == {"commit": commit, "dirty": False, "dirty_paths": []}
    (tmp_path / "repo" / "code.py").write_text("x = 2\n")
    assert git_state() == {"commit": commit, "dirty": True, "dirty_paths": ["code.py"]}
    monkeypatch.setattr(_common, "REPO", tmp_path)  # not a checkout
    assert git_state() == {"commit": None, "dirty": None, "dirty_paths": []}


def test_write_result_notes_a_head_that_moved_during_the_run(tmp_path, monkeypatch):
    run = git_repo(tmp_path / "repo", monkeypatch)
    monkeypatch.setattr(_common, "RESULTS_DIR", tmp_path / "results")
    commit_file(run, tmp_path / "repo", "code.py", "x = 1\n")
    payload = {"machine": {"git": git_state()}}
    write_result("same", payload)
    assert "commit_at_end" not in json.loads((tmp_path / "results" / "same.json").read_text())["machine"]["git"]
    moved = commit_file(run, tmp_path / "repo", "code.py", "x = 2\n")
    write_result("moved", payload)
    assert json.loads((tmp_path / "results" / "moved.json").read_text())["machine"]["git"]["commit_at_end"] == moved


def test_same_code_as_head_ignores_results_and_markdown_only(tmp_path, monkeypatch):
    run = git_repo(tmp_path / "repo", monkeypatch)
    (tmp_path / "repo" / "benchmarks" / "results").mkdir(parents=True)
    code = commit_file(run, tmp_path / "repo", "code.py", "x = 1\n")
    commit_file(run, tmp_path / "repo", "benchmarks/results/r.json", "{}")
    docs = commit_file(run, tmp_path / "repo", "README.md", "text")
    assert results_md.same_code_as_head.__wrapped__(code)
    commit_file(run, tmp_path / "repo", "code.py", "x = 2\n")
    assert not results_md.same_code_as_head.__wrapped__(docs)
    assert not results_md.same_code_as_head.__wrapped__("f" * 40)  # unknown to git: cannot vouch for it


@pytest.mark.parametrize(
    ("record", "cell"),
    [
        ({"commit": HEAD, "dirty": False, "dirty_paths": []}, "aaaaaaa (HEAD)"),
        ({"commit": SAME_CODE, "dirty": False, "dirty_paths": []}, "bbbbbbb (same code as HEAD)"),
        ({"commit": OLD, "dirty": False, "dirty_paths": []}, "ccccccc (not HEAD)"),
        ({"commit": HEAD, "dirty": True, "dirty_paths": ["README.md"]}, "aaaaaaa (HEAD)"),
        ({"commit": HEAD, "dirty": True, "dirty_paths": ["tlfusion/x.py"]}, "aaaaaaa + uncommitted changes (not HEAD)"),
        ({"commit": HEAD, "commit_at_end": OLD}, "aaaaaaa…ccccccc, HEAD moved during the run (not HEAD)"),
        (None, "not recorded (not HEAD)"),
        (results_md.CARRIED_OVER, "carried over, not recorded (not HEAD)"),
    ],
)
def test_commit_cell_marks_what_was_not_measured_with_heads_code(fake_head, record, cell):
    assert results_md.commit_cell(record) == cell


def test_every_table_says_where_each_row_was_measured(results: Path, fake_head):
    payload = json.loads((results / "fewshot_speed.json").read_text())
    payload["machine"]["git"] = {"commit": OLD, "dirty": False, "dirty_paths": ["tlfusion/x.py"]}
    text = results_md.section("fewshot_speed", payload)
    assert "| prototype | 200 | 0.5 | 0.7 | ccccccc + uncommitted changes (not HEAD) |" in text
    assert "**2 of 2 rows not measured with the code of HEAD** (aaaaaaa" in text
    assert "uncommitted changes to tracked files: tlfusion/x.py" in text
    made_up = results_md.section("made_up", json.loads((results / "made_up.json").read_text()))
    assert (
        "Commit: not recorded" in made_up and "| speed_s | ≤ 2 | 3 | **not met** | not recorded (not HEAD) |" in made_up
    )


def test_accuracy_rows_carried_over_from_an_earlier_invocation_are_marked(results: Path, fake_head):
    payload = json.loads((results / "accuracy.json").read_text())
    payload["machine"]["git"] = {"commit": HEAD, "dirty": False, "dirty_paths": []}
    payload["carried_over"] = ["hand__scratch"]
    text = results_md.section("accuracy", payload)
    assert "| hand | 0 | in_domain | fusion/lr | 10 | 0.5 [0.4, 0.9] |" in text
    selected = text.split("**model selected")[1].split("**hand")[0]
    assert "| 0 | aaaaaaa (HEAD) |" in selected and "| 0 | carried over, not recorded (not HEAD) |" in selected
    assert "**1 of 2 rows not measured with the code of HEAD**" in selected
    both = "| aaaaaaa (HEAD); carried over, not recorded (not HEAD) |"  # in-domain minus scratch uses both runs
    assert f"| hand | 0 | fusion/lr | 0.3 | 0 {both}" in text
    assert text.endswith("| leg__scratch | not measured |")  # no "measured with HEAD" sentence for it


def finetuned_run(folder: Path, **changes) -> Path:
    """A run folder whose two backbones' train.json hold fracatlas_hand's shipped recipe at seed 1 (with `changes`)."""
    from tlfusion.config.experiment import load_experiment

    experiment = load_experiment(Path("experiments/fracatlas_hand.yaml"), ["seed=1"])
    for entry in experiment.backbones:
        settings = experiment.finetune.model_dump(exclude={"enabled", "distribute"})
        settings |= {"weights": entry.weights, "image_size": experiment.image.size, "seed": 1, "augment": True}
        (folder / "backbones" / entry.name).mkdir(parents=True)
        (folder / "backbones" / entry.name / "train.json").write_text(json.dumps({"settings": settings | changes}))
    return folder


def test_reused_finetuning_points_the_backbones_at_the_run_and_skips_finetuning(tmp_path: Path):
    finetuned_run(tmp_path / "s1")
    arguments = overrides("fracatlas_hand", "imagenet", 1, str(tmp_path / "s{seed}"))[1::2]
    assert "finetune.enabled=false" in arguments
    assert f"backbones.1.weights={tmp_path / 's1' / 'backbones' / 'mobilenetv2' / 'model.keras'}" in arguments
    assert "finetune.enabled=false" not in overrides("fracatlas_hand", "scratch", 1, str(tmp_path / "s{seed}"))


def test_reused_finetuning_refuses_a_run_with_another_recipe(tmp_path: Path):
    from tlfusion.config.experiment import load_experiment

    shipped = load_experiment(Path("experiments/fracatlas_hand.yaml")).finetune.epochs
    finetuned_run(tmp_path / "s1", epochs=shipped + 1)
    with pytest.raises(SystemExit, match="epochs"):
        reused_backbones("fracatlas_hand", 1, tmp_path / "s1")


def test_refactor_equivalence_compares_every_leaf_and_keys_rows_by_their_text(tmp_path: Path):
    from benchmarks.refactor_equivalence import compare_files, differing, leaves, same_file

    rows = [
        {"model": "fusion/lr", "split": "test", "kappa": 0.5},
        {"model": "fusion/svm", "split": "test", "kappa": 0.4},
    ]
    assert leaves({"results": rows})["/results[model=fusion/svm|split=test]/kappa"] == 0.4
    assert differing(leaves({"results": rows}), leaves({"results": rows[::-1]})) == []  # row order does not matter
    moved = [rows[0] | {"kappa": 0.5 + 1e-6}, rows[1]]
    assert differing(leaves({"results": rows}), leaves({"results": moved})) == [
        "/results[model=fusion/lr|split=test]/kappa: 0.5 vs 0.500001"
    ]
    assert differing({"/a": 1.0}, {"/a": 1.0 + 1e-12, "/b": "x"}) == ["/b: <missing> vs x"]
    note = "clipped to [0, 1] (tlfusion.fewshot_intervals)"  # the base side's module path, renamed by the layout
    assert differing({"/n": note}, {"/n": note.replace("fewshot_intervals", "fewshot.intervals")}) == []
    assert differing({"/n": note}, {"/n": note.replace("fewshot_intervals", "fewshot.other")}) != []
    for side, kappa in (("base", 0.5), ("head", 0.6)):
        (tmp_path / side / "features").mkdir(parents=True)
        (tmp_path / side / "metrics.json").write_text(json.dumps({"results": [{"model": "m", "kappa": kappa}]}))
        np.save(tmp_path / side / "features" / "b.npy", np.zeros((2, 3)) + (side == "head") * 1e-3)
    files = compare_files(tmp_path / "base", tmp_path / "head")
    assert files["metrics.json"]["differing"] == 1 and not same_file(files["metrics.json"])
    assert files["features/b.npy"]["max_abs_difference"] == pytest.approx(1e-3) and not same_file(
        files["features/b.npy"]
    )


def test_refactor_equivalence_table_names_the_differing_files():
    files = {"metrics.json": {"differing": 2, "first": ["/a: 1 vs 2"]}, "features/b.npy": {"max_abs_difference": 0.0}}
    run = {"wall_s": 10.0}
    payload = {
        "benchmark": "refactor_equivalence",
        "settings": {"commits": {"base": "8d2528c" + "0" * 33, "head": "ab43158" + "0" * 33}},
        "experiments": {
            "demo": {
                "identical": False,
                "outcome": {"base": {"selected": "fusion/vote"}, "head": {"selected": "fusion/lr"}},
                "probability_gaps": {"cv": 0.05, "test": 0.0},
                "runs": {"base": run, "head": run},
                "files": files,
            }
        },
    }
    text = results_md.section("refactor_equivalence", payload)
    assert (
        "| demo | no | selected fusion/vote | selected fusion/lr | 0.05 | 0 | 1 of 2: metrics.json | /a: 1 vs 2 |"
        in (text)
    )


def test_the_in_domain_inits_point_every_backbone_at_the_shipped_files():
    from benchmarks.accuracy import IMAGENET_MSK

    frozen = overrides("fracatlas_hand", "imagenet_msk_frozen")[1::2]
    assert "finetune.enabled=false" in frozen
    assert f"backbones.0.weights={IMAGENET_MSK['mobilenet']}" in frozen
    assert f"backbones.1.weights={IMAGENET_MSK['mobilenetv2']}" in frozen
    imagenet = overrides("fracatlas_hand", "imagenet")[1::2]
    assert "backbones.1.weights=imagenet" in imagenet and "finetune.enabled=false" not in imagenet


PAIRED_INITS = ("imagenet_msk", "imagenet")


def _selected_run(folder: Path, probabilities: list[float], labels: list[int]) -> None:
    import pandas as pd

    (folder / "fit").mkdir(parents=True)
    rows = {"path": [f"img{i}.png" for i in range(len(labels))], "y_true": labels, "prob": probabilities}
    rows |= {"patient": [f"p{i}" for i in range(len(labels))], "split": "test", "model": "fusion/lr"}
    pd.DataFrame(rows).to_csv(folder / "fit" / "predictions.csv", index=False)
    (folder / "fit" / "selection.json").write_text(json.dumps({"thresholds": {"fusion/lr": 0.5}}))


def test_selected_models_of_two_inits_are_compared_on_the_same_images(tmp_path: Path, monkeypatch):
    from benchmarks import accuracy

    monkeypatch.setattr(accuracy, "RUNS", tmp_path)
    labels = [0, 1] * 20
    better = [0.2 if y == 0 else 0.8 for y in labels]
    worse = [0.6 if i % 4 == 0 else (0.3 if y == 0 else 0.7) for i, y in enumerate(labels)]
    _selected_run(accuracy.run_dir("hand", "imagenet_msk"), better, labels)
    _selected_run(accuracy.run_dir("hand", "imagenet"), worse, labels)
    results = [{"experiment": "hand", "seed": 0, "init": init, "selected": "fusion/lr"} for init in PAIRED_INITS]
    (row,) = accuracy.selected_paired(results, *PAIRED_INITS)
    assert row["n"] == 40 and row["comparison"] == "imagenet_msk - imagenet"
    assert row["kappa"]["delta"] == pytest.approx(1.0 - 0.5)  # 10 of the 20 negatives called positive
    assert row["kappa"]["ci"][0] > 0 and row["auroc"]["delta"] == pytest.approx(0.0, abs=0.3)
    assert accuracy.selected_paired(results[:1], *PAIRED_INITS) == []


def nih_chest_metrics() -> dict:
    """A multi-label metrics.json of two losses on two findings, as the semantic stage writes it."""
    rows = [
        {"model": loss, "split": "test", "finding": name, "auroc": auroc, "ci": {"auroc": [auroc - 0.1, auroc + 0.1]}}
        | {"positives": positives}
        for loss, offset in (("bce", 0.0), ("dual_weighted", 0.02))
        for name, auroc, positives in (
            ("Mass", 0.6 + offset, 7),
            ("Nodule", 0.7 + offset, 9),
            ("mean", 0.65 + offset, 16),
        )
    ]
    return {
        "selected": "dual_weighted",
        "val_mean_auroc": {"bce": 0.61, "dual_weighted": 0.63},
        "results": rows,
        "vs_bce": {"dual_weighted": {"delta": 0.02, "ci": [-0.01, 0.05]}},
        "gzsl": {loss: {"seen": 0.7, "unseen": 0.5, "h": 0.58} for loss in ("bce", "dual_weighted")},
        "gzsl_ci": {"dual_weighted": {"seen": [0.6, 0.8], "unseen": [0.4, 0.6], "h": [0.5, 0.66]}},
        "unseen": ["Nodule"],
        "finetune": {"mobilenet": {"chosen": "balanced", "val_auc": {"bce": 0.58, "balanced": 0.6}}},
        "data": {"images": 720, "patients": 716},
    }


def test_nih_chest_summary_and_its_results_md_tables():
    from benchmarks.nih_chest import summary

    payload = summary(nih_chest_metrics()) | {"machine": MACHINE}
    assert payload["selected_test_mean_auroc"] == 0.67
    assert payload["selected_test_mean_auroc_ci"] == pytest.approx([0.57, 0.77])
    assert set(payload["per_finding_selected"]) == {"Mass", "Nodule"}
    payload["start_screen"] = {
        "n_train": 400,
        "n_val": 140,
        "val_mean_auroc": {"imagenet": {"fusion": 0.62, "mobilenet": 0.6}, "imagenet_msk": {"fusion": 0.57}},
        "val_best_fused": "imagenet",
    }
    text = results_md.section("nih_chest", payload)
    assert "| dual_weighted (selected) | 0.63 | 0.67 | [0.57, 0.77] | 0.02 [-0.01, 0.05] | 0.7 | 0.5 | 0.58 |" in text
    assert "| Nodule | 9 | 0.72 | [0.62, 0.82] |" in text
    assert "| imagenet_msk | 0.57 | – |" in text and "best fused: imagenet" in text


def test_nih_chest_start_screen_scores_each_finding_on_validation_only():
    from benchmarks.nih_chest import val_mean_auroc

    rng = np.random.default_rng(0)
    Y = rng.integers(0, 2, size=(120, 3)).astype(float)
    train = np.arange(120) < 80
    Y[train, 2] = 0  # one class in train: left out, not scored
    informative = np.hstack([Y[:, :2] + 0.1 * rng.normal(size=(120, 2)), rng.normal(size=(120, 3))])
    assert val_mean_auroc(informative, Y, train, ["a", "b", "c"]) == 1.0
    assert val_mean_auroc(rng.normal(size=(120, 5)), Y, train, ["a", "b", "c"]) < 0.8


def test_knee_head_screen_turns_cumulative_logits_into_class_probabilities():
    from benchmarks.knee_head_screen import ordinal_probabilities, softmax_probabilities

    logits = np.array([[3.0, 0.0, -3.0], [-1.0, 1.0, 0.0]])  # the second row is not monotone: P(>1) > P(>0)
    prob = ordinal_probabilities(logits)
    assert prob.shape == (2, 4) and np.allclose(prob.sum(axis=1), 1) and (prob >= 0).all()
    assert np.isclose(prob[0, 0], 1 - 1 / (1 + np.exp(-3.0)))  # P(grade 0) = 1 - P(grade > 0)
    assert prob[1, 1] == 0  # P(grade > 1) capped at P(grade > 0): nothing left for grade 1
    assert np.allclose(softmax_probabilities(np.zeros((1, 5))), 0.2)
