"""Regenerate benchmarks/RESULTS.md from every benchmarks/results/*.json.

    python -m benchmarks.results_md [--results DIR] [--out FILE]

One section per result file: what the benchmark measures (the first line of its module's docstring), the command
that reproduces it, the machine and its load, the settings, tables of the key numbers and, where the JSON has a
``targets`` mapping, each target with met / not met. Every table ends with a "measured at" column: the commit the
row was measured at (``machine.git``, or a row's own ``git``), marked "(not HEAD)" when the code differs from HEAD's
(another commit, uncommitted changes, a row carried over from an earlier invocation, or no commit recorded), with a
sentence under the table saying how many rows that is. Known benchmarks get a hand-picked table (``SUMMARISERS``);
any other JSON falls back to a generic rendering: scalars become a two-column table and every mapping (or list)
of records becomes a table with one row per record.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

from benchmarks._common import RESULTS_DIR, git

BENCHMARKS_DIR = Path(__file__).parent
META_KEYS = ("benchmark", "machine", "settings", "targets", "quick", "notes")
MAX_COLUMNS = 10
MAX_SUBKEYS = 8
Table = tuple[str, list[str], list[list]]


# ----------------------------------------------------------------- formatting
def fmt(value) -> str:
    """A cell: 3 significant decimals for floats, lists of numbers as [a, b], None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) < 0.01 and value != 0:
            return f"{value:.3g}"
        return (f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3f}").rstrip("0").rstrip(".")
    if isinstance(value, list):
        return "[" + ", ".join(fmt(item) for item in value) + "]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: Iterable[list]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def is_scalar(value) -> bool:
    """Numbers, strings, booleans, None and short lists of them (e.g. a confidence interval)."""
    if isinstance(value, list):
        return len(value) <= 6 and all(isinstance(item, (int, float, str)) for item in value)
    return value is None or isinstance(value, (int, float, str, bool))


def flatten(node, prefix: str = "") -> dict:
    """Every scalar under ``node`` keyed by its dotted path."""
    if is_scalar(node):
        return {prefix: node}
    items = node.items() if isinstance(node, dict) else enumerate(node)
    flat: dict = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


# ----------------------------------------------------------------- where each row was measured
MEASURED_AT = "measured at"
NOT_HEAD = "(not HEAD)"
NOT_MEASURED = "not measured"
CARRIED_OVER = {"carried_over": True}


@cache
def head_commit() -> str | None:
    return git("rev-parse", "HEAD")


def is_code(path: str) -> bool:
    """Files whose change can change a measurement: all but result files and markdown."""
    return not (path.startswith("benchmarks/results/") or path.endswith(".md"))


@cache
def same_code_as_head(commit: str) -> bool:
    """True when no code file differs between ``commit`` and HEAD (False when git cannot tell)."""
    changed = git("diff", "--name-only", commit, "HEAD")
    return changed is not None and not any(is_code(path) for path in changed.splitlines())


def commit_cell(record: dict | None) -> str:
    """One git record (``benchmarks._common.git_state``) as a cell: the short commit, marked unless HEAD's code."""
    if not record or not record.get("commit"):
        return f"{'carried over, ' if record and record.get('carried_over') else ''}not recorded {NOT_HEAD}"
    commit, short = record["commit"], record["commit"][:7]
    if record.get("commit_at_end"):
        return f"{short}…{record['commit_at_end'][:7]}, HEAD moved during the run {NOT_HEAD}"
    dirty = record.get("dirty_paths")
    code_changed = any(map(is_code, dirty)) if dirty is not None else record.get("dirty")
    if code_changed:
        return f"{short} + uncommitted changes {NOT_HEAD}"
    if commit == head_commit():
        return f"{short} (HEAD)"
    return f"{short} (same code as HEAD)" if same_code_as_head(commit) else f"{short} {NOT_HEAD}"


def measured_at(records: Iterable[dict | None]) -> str:
    """The cell for a row computed from runs with these git records."""
    return "; ".join(dict.fromkeys(commit_cell(record) for record in records)) or commit_cell(None)


def file_git(payload: dict) -> dict | None:
    return payload.get("machine", {}).get("git")


def with_measured_at(table: Table, cells: Iterable[str]) -> Table:
    title, header, rows = table
    return title, [*header, MEASURED_AT], [[*row, cell] for row, cell in zip(rows, cells, strict=True)]


def measured_at_note(rows: list[list]) -> str:
    """The sentence under a table: how many of its rows were not measured with HEAD's code."""
    if all(row[-1] == NOT_MEASURED for row in rows):
        return ""
    stale = sum(NOT_HEAD in str(row[-1]) for row in rows)
    head = (head_commit() or "unknown")[:7]
    if not stale:
        return f"All rows measured with the code of HEAD ({head}, when this file was generated)."
    return f"**{stale} of {len(rows)} rows not measured with the code of HEAD** ({head}, when this file was generated)."


MEASURED_AT_HELP = (
    'The last column of every table, "measured at", is the commit the row was measured at: "(HEAD)" or "(same '
    'code as HEAD)" when only results and markdown changed since; "(not HEAD)" when the code differed from HEAD\'s: '
    "an older commit, uncommitted changes to code, a row carried over from an earlier invocation of the benchmark, "
    'or a result from before commits were recorded ("not recorded"). Re-run a benchmark to measure its rows at HEAD.'
)


# ----------------------------------------------------------------- generic rendering
def record_row(record: dict) -> dict:
    """A record's scalars and those of its small sub-mappings (``test.kappa``), in order."""
    row = {}
    for key, value in record.items():
        if is_scalar(value):
            row[key] = value
        elif isinstance(value, dict) and len(value) <= MAX_SUBKEYS:
            row.update({f"{key}.{sub}": item for sub, item in value.items() if is_scalar(item)})
    return row


def records_table(title: str, records: dict | list) -> Table:
    """One row per record; the first MAX_COLUMNS columns that any record has."""
    named = records.items() if isinstance(records, dict) else ((str(i), r) for i, r in enumerate(records))
    rows = {name: record_row(record) for name, record in named}
    columns: list[str] = []
    for row in rows.values():
        columns += [key for key in row if key not in columns]
    columns = columns[:MAX_COLUMNS]
    return title, ["", *columns], [[name, *(row.get(col) for col in columns)] for name, row in rows.items()]


def is_records(node) -> bool:
    """A non-empty mapping or list whose every value is a mapping."""
    values = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
    return bool(values) and all(isinstance(value, dict) for value in values)


def generic_tables(payload: dict) -> list[Table]:
    """Top-level scalars in one table, then one table per mapping/list of records, found recursively."""
    scalars: dict = {}
    tables: list[Table] = []

    def walk(node: dict, path: str) -> None:
        for key, value in node.items():
            name = f"{path}.{key}" if path else key
            if is_scalar(value):
                scalars[name] = value
            elif is_records(value):
                tables.append(records_table(name, value))
            elif isinstance(value, dict):
                walk(value, name)

    walk({key: value for key, value in payload.items() if key not in META_KEYS}, "")
    if scalars:
        tables.insert(0, ("key numbers", ["", "value"], [[key, value] for key, value in scalars.items()]))
    return tables


# ----------------------------------------------------------------- per-benchmark summaries
def summarise_fewshot(payload: dict) -> list[Table]:
    rows = [[r["classifier"], r["episodes_per_s"], r["seconds"], r["auroc"]] for r in payload["classifiers"]]
    rows.append(["(episode sampling)", payload["sampling"]["episodes_per_s"], payload["sampling"]["seconds"], None])
    return [("classifiers", ["classifier", "episodes/s", "seconds", "AUROC (synthetic)"], rows)]


def summarise_finetune(payload: dict) -> list[Table]:
    """Per seed, one row per start and recipe (the recipe each start selected on val is marked); the paired
    in-domain minus scratch differences per seed, and their summary over seeds."""
    header = ["seed", "init", "recipe", "epochs", "train s", "val AUROC", "test kappa [95% CI]", "test AUROC [95% CI]"]
    rows, deltas = [], []
    for seed, run in payload["seeds"].items():
        for init, result in run["results"].items():
            rows += [[seed, init, *recipe_cells(recipe, row, result)] for recipe, row in _recipes(result).items()]
        paired = run.get("in_domain_minus_scratch") or {}
        deltas += [[seed, metric, d["delta"], d["ci"]] for metric, d in paired.items()]
    cell = seed_cell(payload)
    tables = [with_measured_at(("test split", header, rows), (cell([row[0]]) for row in rows))]
    delta_header = ["seed", "metric", "delta", "paired 95% CI"]
    delta_table = ("in-domain minus scratch, same test images", delta_header, deltas)
    tables.append(with_measured_at(delta_table, (cell([row[0]]) for row in deltas)))
    summary = [
        [
            metric,
            s["mean"],
            f"{s['seeds_above_0']} of {len(s['per_seed'])}",
            s["seeds_with_ci_above_0"],
            cell(s["per_seed"]),
        ]
        for metric, s in payload.get("in_domain_minus_scratch_over_seeds", {}).items()
    ]
    summary_header = ["metric", "mean delta", "seeds above 0", "seeds with CI above 0", MEASURED_AT]
    tables.append(("in-domain minus scratch over seeds", summary_header, summary))
    return tables


def seed_cell(payload: dict) -> Callable[[Iterable[str]], str]:
    """The "measured at" cell of a row from these seeds; seeds not in ``settings.seeds_run_now`` were carried over."""
    now = payload.get("settings", {}).get("seeds_run_now")
    gits = {
        seed: row_git(run, payload, now is not None and int(seed) not in now) for seed, run in payload["seeds"].items()
    }
    return lambda seeds: measured_at(gits[str(seed)] for seed in seeds)


def _recipes(result: dict) -> dict[str, dict]:
    return result.get("recipes", {result.get("selected_on_val", "-"): result})


def recipe_cells(recipe: str, row: dict, result: dict) -> list:
    """recipe (marked when selected on val), epochs, train s, val AUROC, test kappa and AUROC with CIs."""
    test, ci = row.get("test", {}), row.get("test", {}).get("ci95", {})
    mark = " (selected on val)" if recipe == result.get("selected_on_val") else ""
    name = recipe + mark if row.get("status") == "ok" else result.get("status")
    timing = [row.get("epochs_run"), row.get("train_seconds"), row.get("val_auroc")]
    return [name, *timing, with_ci(test.get("kappa"), ci.get("kappa")), with_ci(test.get("auroc"), ci.get("auroc"))]


def auroc_cell(auroc: dict) -> str:
    """Mean AUROC and its patient-level 95% CI; ``(no patient CI)`` when not estimable; results from before
    patient intervals (no ``episode_ci95``) show their episode-only interval."""
    if "episode_ci95" in auroc and auroc["ci95"] is None:
        return f"{fmt(auroc['mean'])} (no patient CI)"
    return with_ci(auroc["mean"], auroc["ci95"])


def fewshot_title(dataset: str, block: dict) -> str:
    """The table title: which interval the cells show and the patients per class it rests on."""
    first = next((scores for result in block["results"].values() for scores in result.values()), {})
    patient_level = "episode_ci95" in first.get("auroc", {})
    interval = "95% CI over patients" if patient_level else "95% CI over episodes only, patients ignored"
    patients = ", ".join(f"{label} {count['patients']}" for label, count in block.get("counts", {}).items())
    return f"{dataset}: episode AUROC [{interval}]" + (f"; patients per class: {patients}" if patients else "")


def summarise_fewshot_accuracy(payload: dict) -> list[Table]:
    """Per data set: one row per extractor, one AUROC [95% CI] column per classifier."""
    tables = []
    for dataset, block in payload["datasets"].items():
        classifiers = list(dict.fromkeys(name for result in block["results"].values() for name in result))
        rows = [
            [extractor, *(auroc_cell(scores[name]["auroc"]) for name in classifiers)]
            for extractor, scores in block["results"].items()
        ]
        tables.append((fewshot_title(dataset, block), ["extractor", *classifiers], rows))
    return tables


def summarise_fewshot_screen(payload: dict) -> list[Table]:
    """The stages screen, the transforms screen (per development set) and the decisions they gave."""
    sets = list(payload["settings"]["development_sets"])
    stages = [
        [key, row["mean_auroc_all_classifiers"], row["mean_auroc_prototype"], *(row["per_set"][s] for s in sets)]
        for key, row in payload["stages"].items()
    ]
    header = ["stages", "mean AUROC, all classifiers", "mean AUROC, prototype", *sets]
    transforms = [
        [name, row["mean_auroc"], *(row["per_set"][s] for s in sets)]
        + [with_ci(row.get("gain_over_l2_prototype"), row.get("gain_ci95"))]
        for name, row in payload["transforms"].items()
    ]
    decisions = [[key, value] for key, value in payload["decisions"].items()]
    gain_header = "gain over l2 prototype [95% CI over patients]"
    return [
        ("stages (development sets only)", header, stages),
        ("transforms at the decided stages", ["transform", "mean AUROC", *sets, gain_header], transforms),
        ("decisions", ["", "value"], decisions),
    ]


def summarise_extract(payload: dict) -> list[Table]:
    """Per backbone: the engines on decoded images, the pipelines from files (cold and warm) and the ratios."""
    engine, pipeline, ratio_rows = [], [], []
    for name, result in payload["backbones"].items():
        e = result["engine"]
        engine.append(
            [name, e["keras_predict_on_batch_images_per_s"], e["keras_predict_images_per_s"], e["onnx_images_per_s"]]
            + [e["onnx_conversion_s"], e["onnx_session_start_s"]]
        )
        runs = {key: value for key, value in result["pipeline"].items() if isinstance(value, dict)}
        pipeline += [
            [name, run, r["cold_s"], r["cold_images_per_s"], r["warm_images_per_s"]] for run, r in runs.items()
        ]
        pipeline.append([name, "tlfusion, all features cached", result["pipeline"]["tlfusion_cached_s"], None, None])
        ratio_rows += [[name, key, value] for key, value in result["ratios"].items()]
    engine_header = ["backbone", "Keras predict_on_batch img/s", "Keras predict img/s", "ONNX img/s"]
    pipeline_header = ["backbone", "files to features", "cold s", "cold img/s", "warm img/s"]
    return [
        ("engine on decoded images (warm)", [*engine_header, "ONNX conversion s", "ONNX session start s"], engine),
        ("pipeline from files: cold = first pass in the process, warm = median of the next", pipeline_header, pipeline),
        ("like-for-like ratios (above 1: tlfusion faster)", ["backbone", "ratio", "value"], ratio_rows),
    ]


def summarise_semantic(payload: dict) -> list[Table]:
    supervised = [
        [name, r["mean_auroc"], r["ci95"], r.get("fold_mean_auroc")] for name, r in payload["supervised"].items()
    ]
    tables = [("supervised (mean AUROC over 14 findings)", ["model", "mean AUROC", "95% CI", "fold mean"], supervised)]
    gzsl = payload.get("gzsl", {}).get("results")
    if gzsl:
        tables.append(records_table(f"GZSL (unseen: {', '.join(payload['gzsl']['unseen'])})", gzsl))
    return tables


def summarise_nih_chest(payload: dict) -> list[Table]:
    header = ["semantic loss", "val mean AUROC", "test mean AUROC", "95% CI", "Δ vs BCE [95% CI, paired]"]
    header += ["GZSL seen", "unseen", "H", "H 95% CI"]
    rows = []
    for loss, test in payload["test_mean_auroc"].items():
        delta, gzsl = payload["vs_bce"].get(loss, {}), payload["gzsl"].get(loss, {})
        name = f"{loss} (selected)" if loss == payload["selected"] else loss
        rows.append(
            [name, payload["val_mean_auroc"].get(loss), test["auroc"], test["ci"]]
            + [f"{fmt(delta['delta'])} {fmt(delta['ci'])}" if delta else None]
            + [gzsl.get("seen"), gzsl.get("unseen"), gzsl.get("h"), (gzsl.get("ci") or {}).get("h")]
        )
    findings = [[name, r["positives"], r["auroc"], r["ci"]] for name, r in payload["per_finding_selected"].items()]
    choice = [[key, c["chosen"], c["val_auc"]] for key, c in payload["finetune_loss_choice"].items()]
    return [
        (f"{payload['data']['images']} images, test split by patient", header, rows),
        (f"per finding, {payload['selected']}", ["finding", "test positives", "AUROC", "95% CI"], findings),
        ("fine-tuning loss (chosen on validation)", ["backbone", "chosen", "val AUROC per loss"], choice),
        *_start_screen(payload.get("start_screen")),
    ]


def _start_screen(screen: dict | None) -> list[Table]:
    """The nih_chest start screen: val mean AUROC per start and feature set (none when not measured)."""
    if not screen:
        return []
    sets = sorted({name for scores in screen["val_mean_auroc"].values() for name in scores})
    rows = [[start, *(scores.get(name) for name in sets)] for start, scores in screen["val_mean_auroc"].items()]
    title = (
        f"start on validation only (frozen 224-px features, logistic regression per finding; {screen['n_train']} "
        f"train, {screen['n_val']} val images; best fused: {screen['val_best_fused']})"
    )
    return [(title, ["start", *sets], rows)]


def summarise_scaling(payload: dict) -> list[Table]:
    header = ["images", "seconds", "images/s", "peak RSS MiB", "RSS before extraction MiB", "load avg (1, 5, 15 min)"]
    rows = [
        [
            r["images"],
            r["seconds"],
            r["images_per_s"],
            r["peak_rss_mib"],
            r["rss_before_extract_mib"],
            r["load_average"],
        ]
        for r in payload["sizes"]
    ]
    fit = payload["fit"]
    summary = [
        ["seconds per image (fitted slope)", fit["slope_s_per_image"]],
        ["fixed cost s (intercept)", fit["intercept_s"]],
        ["linear fit R²", fit["r2"]],
        [f"peak RSS growth, {rows[-1][0]} vs {rows[0][0]} images", payload["memory_growth_ratio"]],
    ]
    plot = [["plot", f"![scaling](results/{payload['plot']})"]] if payload.get("plot") else []
    return [("per size (median over repeats)", header, rows), ("fit", ["", "value"], summary + plot)]


def summarise_scale_out(payload: dict) -> list[Table]:
    measured = payload["scale_out"]
    runs = [[name.replace("_", " "), r["seconds"], r["images_per_s"]] for name, r in measured["runs"].items()]
    runs += [
        ["2 vs 1 worker speed-up", measured["two_vs_one_worker_speedup"], None],
        ["cluster efficiency (local / 1 worker)", measured["cluster_efficiency"], None],
    ]
    tables = [(f"{measured['images']} images, one run", ["run", "seconds", "images/s"], runs)]
    for title, rows in payload["projection"].items():
        tables.append((f"projection: {title.replace('_', ' ')}", list(rows[0]), [list(row.values()) for row in rows]))
    return tables


def summarise_end_to_end(payload: dict) -> list[Table]:
    header = ["scenario", "run", "wall s", "peak RSS MiB (largest process)", "peak RSS MiB (tree)", "exit"]
    header += ["load avg before → after", "selected", "test kappa", "test AUROC"]
    rows = []
    for name, scenario in payload["scenarios"].items():
        for run in ("cold", "second_run"):
            r = scenario[run]
            load = f"{fmt(r['load_average_before'][0])} → {fmt(r['load_average_after'][0])}"
            test = r.get("test", {})
            rows.append(
                [name, run, r["wall_s"], r["peak_rss_mib"], r["peak_tree_rss_mib"], r["returncode"], load]
                + [r.get("selected"), test.get("kappa"), test.get("auroc")]
            )
    timings = {name: scenario["cold"].get("stage_timings_s", {}) for name, scenario in payload["scenarios"].items()}
    stages = list(dict.fromkeys(stage for stage_times in timings.values() for stage in stage_times))
    stage_rows = [[name, *(times.get(stage) for stage in stages)] for name, times in timings.items()]
    return [("runs", header, rows), ("cold-run stage seconds", ["scenario", *stages], stage_rows)]


def summarise_accuracy(payload: dict) -> list[Table]:
    runs, cell = payload["runs"], accuracy_cell(payload)
    selected = [
        [r["experiment"], r["seed"], r["init"], r["selected"], *score_cells(r["models"][r["selected"]])]
        + [max(r["test_images_seen_in_pretraining"].values(), default=0)]
        for r in runs
    ]
    tables = [("model selected on the training split (CV), its test scores", SELECTED_HEADER, selected, runs)]
    means = payload.get("selected_mean_over_seeds", [])
    mean_rows = [[m["experiment"], m["init"], len(m["seeds"]), m["mean_kappa"], m["mean_auroc"]] for m in means]
    mean_header = ["experiment", "init", "seeds", "mean kappa", "mean AUROC"]
    tables.append(("selected model's test scores, mean over seeds", mean_header, mean_rows, means))
    for r in runs:
        rows = [[model, *score_cells(scores)] for model, scores in r["models"].items()]
        title = f"{r['experiment']}, seed {r['seed']}, {r['init']}: test split, image level"
        tables.append((title, ["model", *SCORE_HEADER], rows, [r] * len(rows)))
    run_header = ["experiment", "seed", "init"]
    gains, chosen_means = payload["fusion_minus_single"], payload["fusion_minus_cv_chosen_single_mean"]
    chosen_title = "fusion minus the single backbone chosen on CV, same classifier (test; paired 95% CI)"
    tables.append(
        (*fusion_gain_table(chosen_title, gains, "cv_chosen_single", "cv_chosen_single", "_vs_cv_chosen"), gains)
    )
    means_title = "fusion minus the single backbone chosen on CV, averaged over classifiers"
    tables.append((*mean_delta_table(means_title, chosen_means, run_header, "_vs_cv_chosen"), chosen_means))
    best_title = "fusion minus the best single backbone on test (picked on test, so biased towards the singles)"
    tables.append((*fusion_gain_table(best_title, gains, "best_single", "best_single_kappa_backbone"), gains))
    init_gains = payload["init_comparisons"]
    init_keys = ("comparison", "experiment", "seed", "model", "delta_kappa", "delta_auroc")
    init = [[g[key] for key in init_keys] for g in init_gains]
    init_header = ["comparison", "experiment", "seed", "model", "Δ kappa", "Δ AUROC"]
    tables.append(("one init minus another, same model (test)", init_header, init, init_gains))
    paired = payload.get("init_selected_paired", [])
    tables.append((*selected_paired_table(paired), paired))
    per_seed, over_seeds = payload["init_comparisons_mean"], payload["init_comparisons_mean_over_seeds"]
    per_seed_title = "one init minus another, averaged over models"
    tables.append((*mean_delta_table(per_seed_title, per_seed, ["comparison", "experiment", "seed"]), per_seed))
    over_seeds_title = "one init minus another, averaged over models and seeds"
    tables.append((*mean_delta_table(over_seeds_title, over_seeds, ["comparison", "experiment"]), over_seeds))
    measured = [with_measured_at(table, map(cell, records)) for *table, records in tables]
    if payload.get("missing"):
        measured.append(
            ("runs not finished", ["run", MEASURED_AT], [[name, NOT_MEASURED] for name in payload["missing"]])
        )
    return measured


def accuracy_cell(payload: dict) -> Callable[[dict], str]:
    """The "measured at" cell of a row from the runs matching its experiment, init and seed (those it has)."""
    from benchmarks.accuracy import run_key

    carried = set(payload.get("carried_over", []))
    gits = [(run, row_git(run, payload, run_key(run) in carried)) for run in payload["runs"]]

    def cell(row: dict) -> str:
        keys = [key for key in ("experiment", "init", "seed") if key in row]
        return measured_at(record for run, record in gits if all(run[key] == row[key] for key in keys))

    return cell


def selected_paired_table(rows: list[dict]) -> Table:
    """One row per (comparison, experiment, seed): the two inits' CV-selected models and the difference of their
    test kappa and AUROC on the same images with its paired patient-bootstrap CI."""
    header = ["comparison", "experiment", "seed", "n", "models", "Δ kappa [paired CI]", "Δ AUROC [paired CI]"]
    body = [
        [r["comparison"], r["experiment"], r["seed"], r["n"], " vs ".join(r["models"])]
        + [with_ci(r[metric]["delta"], r[metric]["ci"]) for metric in ("kappa", "auroc")]
        for r in rows
    ]
    return "CV-selected model of one init minus the other's, same test images (paired patient bootstrap)", header, body


def row_git(row: dict, payload: dict, carried_over: bool) -> dict | None:
    """A row's own git record; else, unless it was carried over from an earlier invocation, the file's."""
    return row.get("git") or (CARRIED_OVER if carried_over else file_git(payload))


def fusion_gain_table(title: str, gains: list[dict], single: str, backbone: str, suffix: str = "") -> Table:
    """One row per (run, classifier): fusion's kappa, the compared single backbone's (``{single}_kappa``, named by
    ``backbone``), and the kappa and AUROC differences ``delta_METRIC{suffix}`` with their paired CIs."""
    header = ["experiment", "seed", "init", "classifier", "fusion kappa", "single kappa", "single"]
    rows = [
        [g["experiment"], g["seed"], g["init"], g["classifier"], g["fusion_kappa"], g[f"{single}_kappa"], g[backbone]]
        + [with_ci(g[f"delta_{m}{suffix}"], g[f"delta_{m}{suffix}_paired_ci"]) for m in ("kappa", "auroc")]
        for g in gains
    ]
    return title, [*header, "Δ kappa [paired CI]", "Δ AUROC [paired CI]"], rows


def mean_delta_table(title: str, means: list[dict], keys: list[str], suffix: str = "") -> Table:
    """One row per summary of `benchmarks.accuracy.mean_deltas`: its keys, the count, each metric's mean delta and
    how many deltas are above 0."""
    count = next((name for name in ("models", "classifiers") if means and name in means[0]), "n")
    header = [*keys, count, "mean Δ kappa", "Δ kappa > 0", "mean Δ AUROC", "Δ AUROC > 0"]
    rows = [
        [m[key] for key in keys]
        + [m.get(count)]
        + [m[f"{kind}_delta_{metric}{suffix}"] for metric in ("kappa", "auroc") for kind in ("mean", "positive")]
        for m in means
    ]
    return title, header, rows


SCORE_HEADER = ["n", "kappa [95% CI]", "F1 [95% CI]", "accuracy [95% CI]", "AUROC [95% CI]"]
SELECTED_HEADER = ["experiment", "seed", "init", "selected", *SCORE_HEADER, "test images seen in pretraining"]


def score_cells(scores: dict) -> list:
    """n, then each metric with its CI."""
    ci = scores.get("ci", {})
    return [scores.get("n"), *(with_ci(scores.get(m), ci.get(m)) for m in ("kappa", "f1", "accuracy", "auroc"))]


def with_ci(value, interval) -> str:
    """``0.512 [0.43, 0.59]``."""
    return fmt(value) if not interval else f"{fmt(value)} {fmt(list(interval))}"


def summarise_init_screen(payload: dict) -> list[Table]:
    """One row per (seed, start, feature set): validation-part AUROC and kappa of a train-fitted classifier."""
    rows = [
        [seed, start, features, scores["n_train"], scores["n_val"], scores["auroc"], scores["kappa"]]
        for seed, starts in payload["seeds"].items()
        for start, sets in starts.items()
        for features, scores in sets.items()
    ]
    header = ["seed", "start", "features", "train", "val", "val AUROC", "val kappa"]
    return [("train -> val, per start and feature set", header, rows)]


def summarise_pretrain_screen(payload: dict) -> list[Table]:
    """One row per (start, task, feature set): the validation-only scores of a frozen-feature probe."""
    rows = [
        [start, task, features, *(scores.get(key) for key in ("n_train", "n_val", "n", "auroc", "kappa", "qwk"))]
        + [scores.get("accuracy")]
        for start, result in payload["candidates"].items()
        for task, sets in result.items()
        if isinstance(sets, dict)
        for features, scores in sets.items()
    ]
    header = ["start", "task", "features", "train", "val", "n (CV)", "val AUROC", "val kappa", "CV qwk", "CV accuracy"]
    return [("frozen features, validation parts only, per start, task and feature set", header, rows)]


def summarise_refactor_equivalence(payload: dict) -> list[Table]:
    commits = {side: commit[:7] for side, commit in payload["settings"]["commits"].items()}
    header = ["experiment", "identical", "outcome base", "outcome head", "max Δprob cv", "max Δprob test"]
    header += ["files differing", "first difference", f"base ({commits['base']}) s", f"head ({commits['head']}) s"]
    rows = []
    for name, result in payload["experiments"].items():
        files, outcome, gaps = result["files"], result.get("outcome", {}), result.get("probability_gaps", {})
        differing = [path for path, e in files.items() if e.get("differing") or e.get("max_abs_difference", 0) != 0]
        first = next((files[path]["first"][0] for path in differing if files[path].get("first")), None)
        shown = [", ".join(f"{key} {fmt(value)}" for key, value in outcome.get(side, {}).items()) for side in commits]
        counted = f"{len(differing)} of {len(files)}" + (f": {', '.join(differing)}" if differing else "")
        rows.append(
            [name, result["identical"], *shown, gaps.get("cv"), gaps.get("test"), counted, first]
            + [result["runs"]["base"]["wall_s"], result["runs"]["head"]["wall_s"]]
        )
    return [("base vs head, every number each run wrote", header, rows)]


def summarise_multiclass(payload: dict) -> list[Table]:
    """Per K-class experiment: the CV-selected model's test metrics with CIs, its per-class rows, the cut-point
    AUROCs of ordinal tasks, fusion minus each single backbone and each target; each row measured at its own run's
    commit (every table's rows start with the experiment's name)."""
    experiments = payload["experiments"]
    header = ["experiment", "wall s", "peak RSS MiB", "selected", "CV score", "test n"]
    header += ["quadratic kappa", "accuracy", "balanced accuracy", "macro-F1", "kappa", "macro AUROC"]
    rows, per_class, cuts, fusion, targets = [], [], [], [], []
    for name, e in experiments.items():
        cv = e["selection"]["cv_scores"].get(e["selected"])
        rows.append(
            [name, e["run"]["wall_s"], e["run"]["peak_tree_rss_mib"], e["selected"], cv, e["test_n"]]
            + [with_ci(e["test"][key]["value"], e["test"][key]["ci"]) for key in MULTICLASS_HEADLINE]
        )
        per_class += [
            [name, c["class"], c["n"], *(with_ci(c[key], c["ci"].get(key)) for key in PER_CLASS)]
            for c in e["test_per_class"]
        ]
        cuts += [
            [name, f">= {c['cut']}", c["positives"], with_ci(c["auroc"], c["ci"])] for c in e["test_cut_auroc"] or []
        ]
        fusion += [
            [name, f["fusion"], f["single"], *(with_ci(f[key]["delta"], f[key]["ci"]) for key in FUSION_DELTAS)]
            for f in e["fusion_vs_single"]
        ]
        targets += [
            [name, key, bound_cell(t["target"]), t["value"], status(t["met"])] for key, t in e["targets"].items()
        ]
    tables = [
        ("the CV-selected model on the test split (patient-bootstrap 95% CIs)", header, rows),
        ("per class, selected model (test)", ["experiment", "class", "n", *PER_CLASS], per_class),
        (
            "ordinal cut points: grade >= c scored by P(grade >= c) (test)",
            ["experiment", "cut", "positives", "AUROC"],
            cuts,
        ),
        (
            "fusion minus single backbone, selected classifier (test; paired 95% CI)",
            ["experiment", "fusion", "single"] + [f"Δ {key}" for key in FUSION_DELTAS],
            fusion,
        ),
        ("targets", ["experiment", "target", "bound", "measured", "status"], targets),
    ]
    cells = {name: commit_cell(entry["machine"].get("git")) for name, entry in experiments.items()}
    return [with_measured_at(table, [cells[row[0]] for row in table[2]]) for table in tables if table[2]]


def bound_cell(target: dict) -> str:
    """``{"min": 0.82}`` as ``≥ 0.82``, ``{"max": 5400}`` as ``≤ 5,400``."""
    return ", ".join(f"{'≥' if side == 'min' else '≤'} {fmt(limit)}" for side, limit in target.items())


MULTICLASS_HEADLINE = ("quadratic_kappa", "accuracy", "balanced_accuracy", "macro_f1", "kappa", "macro_auroc")
PER_CLASS = ("sensitivity", "specificity", "f1", "auroc")
FUSION_DELTAS = ("quadratic_kappa", "macro_auroc")


SUMMARISERS: dict[str, Callable[[dict], list[Table]]] = {
    "refactor_equivalence": summarise_refactor_equivalence,
    "init_screen": summarise_init_screen,
    "pretrain_screen": summarise_pretrain_screen,
    "fewshot_speed": summarise_fewshot,
    "finetune_transfer": summarise_finetune,
    "fewshot_accuracy": summarise_fewshot_accuracy,
    "fewshot_screen": summarise_fewshot_screen,
    "extract": summarise_extract,
    "semantic_nih1000": summarise_semantic,
    "nih_chest": summarise_nih_chest,
    "scaling": summarise_scaling,
    "end_to_end": summarise_end_to_end,
    "scale_out": summarise_scale_out,
    "accuracy": summarise_accuracy,
    "multiclass": summarise_multiclass,
}


# ----------------------------------------------------------------- targets
def target_rows(payload: dict) -> list[list]:
    """``targets``: ``{name: number}`` (an upper bound) or ``{name: {"max"|"min": number}}``; the measured value is
    the scalar whose dotted path, with dots as underscores, equals or ends with ``name``."""
    flat = {key.replace(".", "_"): value for key, value in flatten(payload).items() if not key.startswith("targets")}
    rows = []
    for name, target in payload.get("targets", {}).items():
        bound, limit = ("min", target["min"]) if isinstance(target, dict) and "min" in target else ("max", target)
        limit = limit["max"] if isinstance(limit, dict) else limit
        matches = [value for key, value in flat.items() if key == name or key.endswith("_" + name)]
        measured = matches[0] if matches and isinstance(matches[0], (int, float)) else None
        met = None if measured is None else (measured <= limit if bound == "max" else measured >= limit)
        rows.append([name, f"{'≤' if bound == 'max' else '≥'} {fmt(limit)}", measured, status(met)])
    return rows


def status(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "**not met**"


# ----------------------------------------------------------------- sections
def describe(name: str) -> str:
    """The first line of ``benchmarks/NAME.py``'s docstring, read without importing it."""
    module = BENCHMARKS_DIR / f"{name}.py"
    if not module.is_file():
        return f"(no module benchmarks/{name}.py)"
    docstring = ast.get_docstring(ast.parse(module.read_text())) or ""
    return docstring.splitlines()[0] if docstring else ""


def machine_line(payload: dict) -> str:
    machine = payload.get("machine", {})
    if not machine:
        return "Machine: not recorded."
    load = fmt(machine.get("load_average_1min"))
    after = machine.get("load_average_1min_after")
    load += f" before, {fmt(after)} after" if after is not None else ""
    packages = ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items() if v)
    return (
        f"Machine: {machine.get('processor')}, {machine.get('cpu_count')} CPUs, {machine.get('platform')}, "
        f"Python {machine.get('python')}; load average (1 min) {load}. Packages: {packages or '–'}."
    )


def settings_line(payload: dict) -> str:
    settings = flatten(payload.get("settings", {}))
    return "Settings: " + "; ".join(f"{k}={fmt(v)}" for k, v in settings.items()) + "." if settings else ""


def notes_line(payload: dict) -> str:
    """``notes``: a string or a list of strings, shown as they are."""
    notes = payload.get("notes") or []
    return "Notes: " + " ".join([notes] if isinstance(notes, str) else notes) if notes else ""


def is_quick(payload: dict) -> bool:
    return bool(payload.get("quick") or payload.get("settings", {}).get("quick"))


def section(name: str, payload: dict) -> str:
    """The markdown section for one result file."""
    quick = is_quick(payload)
    module = payload.get("benchmark", name)  # e.g. fewshot_accuracy_quick.json comes from fewshot_accuracy
    parts = [
        f"## {name}",
        describe(module),
        f"Reproduce: `python -m benchmarks.{module}{' --quick' if quick else ''}`"
        + (" (this result is from a `--quick` run)" if quick else ""),
        machine_line(payload),
        commit_line(name, payload),
        settings_line(payload),
        notes_line(payload),
    ]
    try:
        tables = SUMMARISERS.get(module, generic_tables)(payload)
    except (KeyError, TypeError, IndexError):
        tables = generic_tables(payload)
    if payload.get("targets"):
        tables.append(("targets", ["target", "bound", "measured", "status"], target_rows(payload)))
    file_cell = commit_cell(file_git(payload))
    for title, header, rows in tables:
        if MEASURED_AT not in header:
            title, header, rows = with_measured_at((title, header, rows), [file_cell] * len(rows))
        parts += [f"**{title}**", markdown_table(header, rows), measured_at_note(rows)]
    return "\n\n".join(part for part in parts if part)


def commit_line(name: str, payload: dict) -> str:
    """The commit the file's run started at, its uncommitted changes, or why none is known."""
    record = file_git(payload)
    if record and record.get("commit"):
        dirty = ", ".join(record.get("dirty_paths") or []) or "none"
        return f"Run at commit {record['commit'][:7]}; uncommitted changes to tracked files: {dirty}."
    committed = git("log", "-1", "--format=%h", "--", f"benchmarks/results/{name}.json")
    return "Commit: not recorded (this result predates commit recording" + (
        f"; the result file was last committed in {committed})." if committed else ")."
    )


def load_results(results_dir: Path) -> dict[str, dict]:
    """Every readable ``*.json`` in ``results_dir`` by file stem; unreadable files map to an error note."""
    results = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            results[path.stem] = {"error": f"could not read {path.name}: {error}"}
    return results


def render(results: dict[str, dict]) -> str:
    """The whole RESULTS.md."""
    head = [
        "# Benchmark results",
        "Generated by `python -m benchmarks.results_md` from `benchmarks/results/*.json`; do not edit by hand. "
        "Timings come from a shared 2-core machine: read them with the load average next to them.",
        MEASURED_AT_HELP,
    ]
    if not results:
        head.append("No result files yet: run `python -m benchmarks.NAME` first.")
    head += [f"- [{name}](#{name})" for name in results]
    return "\n\n".join([*head, *(section(name, payload) for name, payload in results.items())]) + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of result JSON files")
    parser.add_argument("--out", type=Path, default=BENCHMARKS_DIR / "RESULTS.md", help="markdown file to write")
    args = parser.parse_args(argv)
    args.out.write_text(render(load_results(args.results)))
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
