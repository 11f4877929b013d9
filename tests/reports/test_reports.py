import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tlfusion.errors import InputError
from tlfusion.evaluation.metrics import aggregate_by_study, binary_metrics, bootstrap_ci
from tlfusion.evaluation.results import fusion_vs_single
from tlfusion.reports.reading import format_metric
from tlfusion.reports.report import summary_lines, write_reports

BACKBONES = ("densenet121", "resnet50")
CLASSIFIERS = ("lr", "svm", "xgb")
FINDINGS = ("Atelectasis", "Effusion", "Nodule")


def make_predictions(seed=0, patients=40, images=2):
    """Test and out-of-fold predictions for every model; each model has its own signal strength."""
    rng = np.random.default_rng(seed)
    patient = np.repeat([f"p{i}" for i in range(patients)], images)
    y_true = np.repeat(rng.permutation(np.arange(patients) % 2), images)
    frames = []
    for feature_set in (*BACKBONES, "fusion"):
        for classifier in CLASSIFIERS:
            for split in ("cv", "test"):
                signal = rng.uniform(0.1, 1.2)
                prob = 1 / (1 + np.exp(-(signal * (2 * y_true - 1) + rng.normal(size=len(y_true)))))
                frames.append(
                    pd.DataFrame(
                        {
                            "model": f"{feature_set}/{classifier}",
                            "split": split,
                            "path": [f"{p}_{i % images}.png" for i, p in enumerate(patient)],
                            "patient": patient,
                            "y_true": y_true,
                            "prob": prob,
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)


def binary_metrics_json(predictions, study_level=True):
    """metrics.json content computed from ``predictions`` by tlfusion.evaluation.metrics, as the pipeline does."""
    results = []
    for (model, split), rows in predictions.groupby(["model", "split"], sort=False):
        y, p, groups = rows["y_true"].to_numpy(), rows["prob"].to_numpy(), rows["patient"].to_numpy()
        levels = [("image", y, p, groups)]
        if study_level:
            studies, y_study, p_study = aggregate_by_study(groups, y, p)
            levels.append(("study", y_study, p_study, studies))
        for level, y_level, p_level, g_level in levels:
            row = {"model": model, "level": level, "split": split, **binary_metrics(y_level, p_level), "threshold": 0.5}
            row["ci"] = bootstrap_ci(y_level, p_level, g_level, n_boot=50) if split == "test" else {}
            results.append(row)
    cv_scores = {r["model"]: r["kappa"] for r in results if r["split"] == "cv" and r["level"] == "image"}
    return {
        "experiment": "synthetic_hand",
        "task": "binary",
        "positive_class": "fractured",
        "selected": max(cv_scores, key=cv_scores.get, default=None),
        "selection": {"scoring": "kappa", "cv": 5, "cv_scores": cv_scores},
        "results": results,
        "data": {"images": 80, "patients": 40, "splits": {"test": 80, "train": 80}, "classes": {"0": 40, "1": 40}},
    }


def multilabel_metrics_json(seed=0):
    rng = np.random.default_rng(seed)
    results = []
    models = [f"{fs}/{loss}" for fs in ("densenet121", "fusion") for loss in ("bce", "dual_weighted")]
    for model in models:
        aurocs = rng.uniform(0.55, 0.9, size=len(FINDINGS))
        for finding, auroc in zip(FINDINGS, aurocs, strict=True):
            ci = [float(auroc) - 0.05, float(auroc) + 0.04]
            results.append(
                {
                    "model": model,
                    "level": "image",
                    "split": "test",
                    "n": 100,
                    "finding": finding,
                    "auroc": float(auroc),
                    "ci": {"auroc": ci},
                }
            )
        results.append(
            {
                "model": model,
                "level": "image",
                "split": "test",
                "n": 100,
                "finding": "mean",
                "auroc": float(aurocs.mean()),
                "accuracy": None,
                "kappa": None,
                "ci": {},
            }
        )
    results[1]["auroc"] = None  # a finding with one class in the test split
    return {
        "experiment": "synthetic_nih",
        "task": "multilabel",
        "selected": "fusion/dual_weighted",
        "results": results,
        "gzsl": {model: {"seen": 0.7, "unseen": 0.6 if "fusion" in model else None, "h": 0.65} for model in models},
        "data": {"images": 300, "patients": 120},
    }


TIMINGS = {"fit": 1.5, "evaluate": 0.25}


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    predictions = make_predictions()
    metrics = binary_metrics_json(predictions)
    run_dir = tmp_path_factory.mktemp("binary_run")
    return run_dir, metrics, write_reports(run_dir, metrics, predictions, TIMINGS)


def section(markdown: str, title: str) -> str:
    """The text of the Markdown section whose heading starts with ``title``."""
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", markdown, flags=re.M | re.S)
    assert match, f"no section {title!r}"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """Cells of the Markdown table rows in ``text`` (header and rule dropped)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


class References(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        self.targets += [value for name, value in attrs if name in ("src", "href")]


def check_html_references(run_dir):
    parser = References()
    parser.feed((run_dir / "report.html").read_text())
    assert parser.targets
    for target in parser.targets:
        assert not re.match(r"[a-z]+:|//|/", target), f"{target} is not a relative path"
        assert (run_dir / target).is_file(), target
    return parser.targets


def test_format_metric():
    assert format_metric(0.81234, [0.7511, 0.8659]) == "0.812 [0.751, 0.866]"
    assert format_metric(0.5) == "0.500"
    assert format_metric(1, digits=1) == "1.0"
    assert format_metric(0.5, [None, 0.6]) == "0.500"
    assert format_metric(None, [0.1, 0.2]) == "—"
    assert format_metric(float("nan")) == "—"
    assert format_metric(np.float32(0.25), (np.float64(0.2), 0.3), digits=2) == "0.25 [0.20, 0.30]"


def test_binary_run_writes_every_file(binary_run):
    run_dir, metrics, paths = binary_run
    plots = {key for key in paths if key.startswith("plots/")}
    expected = {"roc_selected", "roc_densenet121", "roc_resnet50", "roc_fusion", "confusion", "kappa_by_classifier"}
    assert plots == {f"plots/{name}.png" for name in expected}
    assert {"report.md", "report.html"} <= set(paths)
    for key, path in paths.items():
        assert path == run_dir / key and path.is_file()
    for key in plots:
        assert paths[key].stat().st_size < 200_000
        with Image.open(paths[key]) as image:
            image.verify()
            assert image.format == "PNG"
    assert not list(run_dir.rglob("*.tmp")), "temporary files left behind"


def test_binary_report_mentions_models_and_selection(binary_run):
    run_dir, metrics, _ = binary_run
    markdown = (run_dir / "report.md").read_text()
    selected = metrics["selected"]
    assert markdown.startswith("# tlfusion report: synthetic_hand")
    score = format_metric(metrics["selection"]["cv_scores"][selected])
    assert f"**{selected}** was chosen by its 5-fold CV kappa {score} on the training split" in markdown
    assert "the test split played no part in the choice" in markdown
    assert table_rows(section(markdown, "Timings")) == [["fit", "1.5"], ["evaluate", "0.2"]]
    for model in {row["model"] for row in metrics["results"]}:
        assert model in section(markdown, "Metrics on the test split, study level")
        assert model in section(markdown, "Metrics on the test split, image level")
    study_table = table_rows(section(markdown, "Metrics on the test split, study level"))
    assert len(study_table) == len(BACKBONES + ("fusion",)) * len(CLASSIFIERS)
    assert [row[0] for row in study_table].count(f"**{selected} (selected)**") == 1
    kappas = [float(row[4].split()[0]) for row in study_table if row[4] != "—"]
    assert kappas == sorted(kappas, reverse=True)
    selected_row = next(
        r for r in metrics["results"] if r["model"] == selected and r["split"] == "test" and r["level"] == "study"
    )
    assert format_metric(selected_row["kappa"], selected_row["ci"]["kappa"]) in markdown
    for key in ("roc_selected", "confusion", "kappa_by_classifier"):
        assert f"](plots/{key}.png)" in markdown


def test_single_vs_fused_table_bolds_the_best_of_each_row(binary_run):
    run_dir, metrics, _ = binary_run
    rows = table_rows(section((run_dir / "report.md").read_text(), "Single backbones vs fusion"))
    test_kappa = {r["model"]: r["kappa"] for r in metrics["results"] if r["split"] == "test" and r["level"] == "study"}
    assert [row[0] for row in rows] == list(CLASSIFIERS)
    for classifier, *cells, _ in rows:
        values = [test_kappa[f"{feature_set}/{classifier}"] for feature_set in (*BACKBONES, "fusion")]
        bold = [index for index, cell in enumerate(cells) if cell.startswith("**")]
        assert bold == [index for index, value in enumerate(values) if value == max(values)]


def test_fusion_gain_is_against_the_single_backbone_chosen_on_cv_not_on_test(binary_run):
    run_dir, metrics, _ = binary_run
    rows = table_rows(section((run_dir / "report.md").read_text(), "Single backbones vs fusion"))
    test_kappa = {r["model"]: r["kappa"] for r in metrics["results"] if r["split"] == "test" and r["level"] == "study"}
    cv_scores = metrics["selection"]["cv_scores"]
    chose_differently = 0
    for classifier, *_, gain in rows:
        singles = [f"{backbone}/{classifier}" for backbone in BACKBONES]
        chosen = max(singles, key=cv_scores.__getitem__)
        chose_differently += chosen != max(singles, key=test_kappa.__getitem__)
        value, versus = gain.split(" vs ")
        assert versus == chosen.split("/")[0]
        assert float(value) == pytest.approx(test_kappa[f"fusion/{classifier}"] - test_kappa[chosen], abs=1e-3)
    assert chose_differently  # the fixture has a classifier where CV and test disagree, so the test can tell


def test_fusion_vs_single_pairs_each_single_backbone_with_the_same_classifier():
    predictions = make_predictions()
    thresholds = dict.fromkeys(predictions["model"].unique(), 0.5)
    comparisons = fusion_vs_single(predictions, thresholds, n_boot=200)
    assert {(row["classifier"], row["single"]) for row in comparisons} == {
        (classifier, f"{backbone}/{classifier}") for classifier in CLASSIFIERS for backbone in BACKBONES
    }
    test = predictions[predictions["split"] == "test"]
    kappa = {model: binary_metrics(rows["y_true"], rows["prob"])["kappa"] for model, rows in test.groupby("model")}
    for row in comparisons:
        assert row["level"] == "image"
        assert row["kappa"]["delta"] == pytest.approx(kappa[row["fusion"]] - kappa[row["single"]])
        low, high = row["kappa"]["ci"]
        assert low <= row["kappa"]["delta"] <= high


def test_fusion_gain_column_shows_the_paired_interval(tmp_path):
    predictions = make_predictions()
    metrics = binary_metrics_json(predictions, study_level=False)
    metrics["fusion_vs_single"] = fusion_vs_single(
        predictions, dict.fromkeys(predictions["model"].unique(), 0.5), n_boot=200
    )
    write_reports(tmp_path, metrics, predictions)
    markdown = (tmp_path / "report.md").read_text()
    assert "paired patient-bootstrap 95% interval" in section(markdown, "Single backbones vs fusion")
    for *_, gain in table_rows(section(markdown, "Single backbones vs fusion")):
        interval = gain.split(" vs ")[0].replace("[", "").replace("]", "").replace(",", "")
        value, low, high = (float(part) for part in interval.split())
        assert low <= value <= high


def test_html_is_self_contained_and_references_existing_files(binary_run):
    run_dir, metrics, paths = binary_run
    text = (run_dir / "report.html").read_text()
    targets = check_html_references(run_dir)
    assert set(targets) == {key for key in paths if key.startswith("plots/")}
    assert "<style>" in text and 'class="sortable"' in text and "http" not in text
    (headline,) = [
        r
        for r in metrics["results"]
        if r["model"] == metrics["selected"] and (r["split"], r["level"]) == ("test", "study")
    ]
    assert f"<b>{metrics['selected']}</b> was chosen" in text
    assert f"<li>kappa {format_metric(headline['kappa'], headline['ci']['kappa'])}</li>" in text


def test_report_links_the_review_gallery_when_there_is_one(tmp_path):
    """No explanations/index.html: no Explanations section; with one: both reports link it by a relative path."""
    predictions = make_predictions()
    metrics = binary_metrics_json(predictions)
    write_reports(tmp_path, metrics, predictions)
    assert "## Explanations" not in (tmp_path / "report.md").read_text()
    (tmp_path / "explanations").mkdir()
    (tmp_path / "explanations" / "index.html").write_text("<!doctype html>")
    write_reports(tmp_path, metrics, predictions)
    markdown = section((tmp_path / "report.md").read_text(), "Explanations")
    assert "[explanations/index.html](explanations/index.html)" in markdown and metrics["selected"] in markdown
    assert '<a href="explanations/index.html">explanations/index.html</a>' in (tmp_path / "report.html").read_text()
    assert "explanations/index.html" in check_html_references(tmp_path)


def test_roc_comparison_picks_the_best_single_backbone_by_cv_not_test(tmp_path):
    predictions = make_predictions()
    metrics = binary_metrics_json(predictions, study_level=False)
    test_auroc = {r["model"]: r["auroc"] for r in metrics["results"] if r["split"] == "test"}
    singles = [m for m in test_auroc if not m.startswith("fusion/")]
    best_on_test = max(singles, key=test_auroc.get)
    metrics["selected"] = "fusion/svm"
    metrics["selection"]["cv_scores"] = {m: (0.9 if m == "resnet50/xgb" else 0.1) for m in test_auroc}
    metrics["selection"]["cv_scores"][best_on_test] = 0.0
    write_reports(tmp_path, metrics, predictions)
    caption = section((tmp_path / "report.md").read_text(), "Plots")
    expected = "fusion/svm (selected); resnet50/xgb (single backbone with the best CV score)."
    assert f"ROC on the test split (image level): {expected}" in caption


def test_undefined_values_and_missing_records_do_not_crash(tmp_path):
    row = {
        "model": "densenet121/lr",
        "level": "image",
        "split": "test",
        "n": 10,
        "accuracy": 0.5,
        "f1": None,
        "kappa": None,
        "auroc": None,
        "sensitivity": None,
        "specificity": 1.0,
        "threshold": None,
        "confusion": [[5, 0], [5, 0]],
        "ci": {"accuracy": [0.2, 0.8], "kappa": None},
    }
    metrics = {
        "task": "binary",
        "selected": "fusion/lr",
        "results": [
            row,
            {**row, "model": "resnet50/lr", "kappa": 0.2, "ci": {}},
            {"model": "fusion/lr", "level": "image", "split": "test", "kappa": 0.1},
        ],
    }
    paths = write_reports(tmp_path, metrics, None)
    (tmp_path / "plain.txt").write_text("")  # written files get the usual permissions, not mkstemp's 0600
    assert paths["report.md"].stat().st_mode == (tmp_path / "plain.txt").stat().st_mode
    markdown = paths["report.md"].read_text()
    assert "—" in markdown and "0.500 [0.200, 0.800]" in markdown
    assert "no selection record" in markdown
    fusion_rows = table_rows(section(markdown, "Single backbones vs fusion"))
    assert fusion_rows == [["lr", "—", "**0.200**", "0.100", "—"]]  # no CV scores: no single backbone to compare
    assert "plots/kappa_by_classifier.png" in paths and "plots/roc_selected.png" not in paths
    check_html_references(tmp_path)
    assert len(summary_lines(metrics)) >= 2


def test_single_model_bundle_evaluation_on_another_split(tmp_path):
    predictions = make_predictions().query("model == 'fusion/lr' and split == 'test'").assign(split="val")
    metrics = binary_metrics_json(predictions, study_level=False)
    del metrics["selection"], metrics["data"]
    metrics["selected"] = "fusion/lr"
    paths = write_reports(tmp_path, metrics, predictions)
    markdown = paths["report.md"].read_text()
    assert "## Metrics on the val split, image level" in markdown
    assert "Needs at least one single-backbone model" in markdown
    assert {"plots/roc_selected.png", "plots/roc_fusion.png", "plots/confusion.png"} <= set(paths)
    assert summary_lines(metrics)[1] == "val, image level, n=80:"


def test_multilabel_reports(tmp_path):
    metrics = multilabel_metrics_json()
    paths = write_reports(tmp_path, metrics, None)
    plots = {"plots/auroc_by_finding.png", "plots/auroc_by_classifier.png", "plots/auroc_per_finding.png"}
    assert set(paths) == {"report.md", "report.html", *plots}
    for key in plots:
        with Image.open(paths[key]) as image:
            image.verify()
        assert paths[key].stat().st_size < 200_000
    markdown = paths["report.md"].read_text()
    per_finding = table_rows(section(markdown, "AUROC per finding"))
    assert [row[0] for row in per_finding] == [*FINDINGS, "mean"]
    for row in per_finding:
        assert sum(cell.startswith("**") for cell in row[1:]) == 1
    models = {row["model"] for row in metrics["results"]}
    for model in models:
        assert model in section(markdown, "Mean AUROC on the test split")
        assert model in section(markdown, "Generalised zero-shot")
    assert "**fusion/dual_weighted** is the model evaluated here" in markdown
    check_html_references(tmp_path)


def test_summary_lines():
    metrics = binary_metrics_json(make_predictions())
    lines = summary_lines(metrics)
    assert 3 <= len(lines) <= 6
    assert lines[0].startswith(f"synthetic_hand: selected {metrics['selected']} (5-fold CV kappa ")
    row = next(
        r
        for r in metrics["results"]
        if r["model"] == metrics["selected"] and r["split"] == "test" and r["level"] == "study"
    )
    assert f"kappa {format_metric(row['kappa'], row['ci']['kappa'])}" in "\n".join(lines)
    assert f"AUROC {format_metric(row['auroc'], row['ci']['auroc'])}" in "\n".join(lines)
    multilabel = summary_lines(multilabel_metrics_json())
    assert 2 <= len(multilabel) <= 6 and "fusion/dual_weighted" in multilabel[0]
    assert any(line.startswith("GZSL AUROC: seen 0.700") for line in multilabel)


def test_bad_input_names_the_problem(tmp_path):
    with pytest.raises(InputError, match="results"):
        write_reports(tmp_path, {"selected": "x"}, None)
    with pytest.raises(InputError, match=r"results\[0\]"):
        summary_lines({"results": [{"split": "test"}]})
    predictions = make_predictions().drop(columns="prob")
    with pytest.raises(InputError, match="prob"):
        write_reports(tmp_path, binary_metrics_json(make_predictions()), predictions)
