"""The bundle commands behind `tlfusion predict / evaluate / explain / fewshot`: explicit parameters in, data out.

They take a loaded `Bundle` (the CLI loads it and reports its trust level) and return what the CLI prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tlfusion.config.experiment import Experiment, load_experiment
from tlfusion.data.table import class_names, split_table, with_binary_target, with_class_codes
from tlfusion.errors import InputError
from tlfusion.evaluation.results import class_results, clinical_checks, evaluate_predictions, pick_cases
from tlfusion.evaluation.schema import write_metrics
from tlfusion.run.paths import RunPaths
from tlfusion.run.readers import class_prediction_rows, prediction_rows

if TYPE_CHECKING:
    from tlfusion.bundle.model import Bundle

EXPLAIN_METHODS = ("gradcam", "lime")


def experiment_rows(data: str, data_root: str | None, split: str) -> tuple[Experiment, pd.DataFrame]:
    """The experiment at `data` and its images in `split` ("all": every image)."""
    from tlfusion.data.sources import read_sources

    experiment = load_experiment(data, data_root=data_root)
    table = read_sources(experiment.data)
    if split != "all":
        table = split_table(table, experiment.split, experiment.seed)
        table = table[table["split"] == split]
    if table.empty:
        raise InputError(f"{data}: no images in split {split!r}")
    return experiment, table


def readable_images(inputs: list[str], skip_bad: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files named or found in the folders named, and (path, reason) of those skipped as unreadable."""
    from tlfusion.data.files import image_files
    from tlfusion.data.images import IMAGE_KINDS, scan_images

    paths: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():  # entries that are not regular files are listed for scan_images to refuse by name
            found = [str(p) for p in image_files(item, follow_symlinks=True)]
            if not found:
                raise InputError(f"{item}: no images in this folder ({IMAGE_KINDS} files)")
            paths += found
        elif item.exists() or item.is_symlink():
            paths.append(str(item))
        else:
            raise InputError(f"{item}: no such file or folder")
    hashes, bad = scan_images(paths, skip_bad=skip_bad)
    return [p for p, h in zip(paths, hashes, strict=True) if h], bad


def predict_images(
    bundle: Bundle, paths: list[str], scheduler: str | None = None, folder: str | Path | None = None
) -> pd.DataFrame:
    """One row per readable image file: path, probability of the positive class, the decision threshold used and
    the predicted class (a K-class bundle: `prob_<class>` for every class and the most probable class as
    `predicted`), then, when the bundle has an out-of-distribution calibration (`tlfusion.bundle.ood`), the image's
    `ood_score` and `out_of_distribution` (score above 1). With `scheduler`, the probabilities are computed by that
    Dask cluster's workers from the bundle at `folder` (`tlfusion.bundle.cluster_predict`), without the
    out-of-distribution check."""
    if scheduler:
        from tlfusion.bundle.cluster_predict import predict_on_cluster

        prob, scores = predict_on_cluster(scheduler, folder, paths), None
    else:
        prob, scores = bundle.assess_paths(paths)
    frame = _class_frame(bundle, paths, prob) if bundle.task == "multiclass" else _binary_frame(bundle, paths, prob)
    if scores is not None:
        frame["ood_score"] = scores
        frame["out_of_distribution"] = scores > 1
    return frame


def _class_frame(bundle: Bundle, paths: list[str], prob: np.ndarray) -> pd.DataFrame:
    """path, prob_<class> per class (bundle order), predicted (the most probable class)."""
    columns = {f"prob_{name}": prob[:, k] for k, name in enumerate(bundle.class_names)}
    predicted = np.asarray(bundle.class_names)[prob.argmax(axis=1)]
    return pd.DataFrame({"path": paths, **columns, "predicted": predicted})


def _binary_frame(bundle: Bundle, paths: list[str], prob: np.ndarray) -> pd.DataFrame:
    """path, prob_<positive>, threshold, predicted."""
    prob = prob[:, 1]
    return pd.DataFrame(
        {
            "path": paths,
            f"prob_{bundle.class_names[1]}": prob,
            "threshold": bundle.threshold,
            "predicted": np.where(prob >= bundle.threshold, bundle.class_names[1], bundle.class_names[0]),
        }
    )


def prediction_summary(bundle: Bundle, frame: pd.DataFrame, out: str | None, scheduler: str | None) -> list[str]:
    """What `tlfusion predict` says about `predict_images`' `frame` written to `out` (None: standard output)."""
    counts = frame["predicted"].value_counts()
    where = f"written to {out}" if out else "on standard output"
    if bundle.task == "multiclass":
        per_class = ", ".join(f"{int(counts.get(name, 0))} {name}" for name in bundle.class_names)
        rule = "the most probable class"
    else:
        per_class = ", ".join(f"{int(counts.get(name, 0))} {name}" for name in reversed(bundle.class_names))
        rule = f"prob_{bundle.class_names[1]} >= threshold {bundle.threshold:.4g}"
    lines = [f"{len(frame)} images scored: {per_class} ({rule}); CSV {where}"]
    if "out_of_distribution" in frame.columns:
        flagged = int(frame["out_of_distribution"].sum())
        if flagged:
            lines.append(
                f"warning: {flagged} of {len(frame)} images look unlike the training images (further out than "
                f"{bundle.ood.quantile:.0%} of them; out_of_distribution in the CSV): their predictions are unreliable"
            )
    elif scheduler:
        lines.append("note: no out-of-distribution check with --scheduler")
    else:
        lines.append(
            "note: this bundle has no out-of-distribution calibration (saved by an older tlfusion, or from too few "
            "training images); re-run its experiment to add one"
        )
    return lines


def evaluate_bundle(bundle: Bundle, data: str, out: str | Path, data_root: str | None = None, split: str = "test"):
    """Metrics (with CIs) and a report for a saved bundle on an experiment's images, written to `out`; returns
    the metrics."""
    from tlfusion.bundle.model import check_class_names
    from tlfusion.reports.report import write_reports

    experiment, table = experiment_rows(data, data_root, split)
    if bundle.task == "multiclass":
        return _evaluate_class_bundle(bundle, experiment, _class_rows(bundle, table), out, split)
    check_class_names(bundle, class_names(table["label"], bundle.class_names[1]))
    table = with_binary_target(table, bundle.class_names[1])
    prob = bundle.predict_paths(table["path"].tolist())[:, 1]
    name = bundle.meta.get("model", "bundle")
    predictions = prediction_rows(table, name, split, prob)
    spec = experiment.evaluate
    metrics = {
        "experiment": experiment.name,
        "task": "binary",
        "positive_class": bundle.class_names[1],
        "selected": name,
        "results": evaluate_predictions(
            predictions, {name: bundle.threshold}, spec.study_aggregation, spec.bootstrap, experiment.seed
        ),
    }
    stage = "before" if bundle.calibration is None else "after"  # the bundle's probabilities, as it gives them
    spec = spec.model_copy(update={"calibration": None})  # no out-of-fold rows here to recalibrate on
    metrics |= clinical_checks(predictions, table, spec, name, bundle.threshold, experiment.seed, split, stage)
    write_metrics(RunPaths(out).metrics, metrics)
    write_reports(Path(out), metrics, predictions)
    return metrics


def _class_rows(bundle: Bundle, table: pd.DataFrame) -> pd.DataFrame:
    """`table` with the K-class bundle's class codes `y`; InputError for a label the bundle does not know."""
    unknown = sorted(set(table["label"].astype(str)) - set(bundle.class_names))
    if unknown:
        raise InputError(f"data labels {unknown} are not among the bundle's classes {bundle.class_names}")
    return with_class_codes(table, bundle.class_names)


def _evaluate_class_bundle(bundle: Bundle, experiment: Experiment, table: pd.DataFrame, out: str | Path, split: str):
    """`evaluate_bundle` for a K-class bundle: its result row (CIs on the test split) and report."""
    from tlfusion.reports.report import write_reports

    name = bundle.meta.get("model", "bundle")
    prob = bundle.predict_paths(table["path"].tolist())
    predictions = class_prediction_rows(table, name, split, prob)
    metrics = {
        "experiment": experiment.name,
        "task": "multiclass",
        "classes": list(bundle.class_names),
        "ordinal": bundle.ordinal,
        "selected": name,
        "results": class_results(
            predictions, list(bundle.class_names), experiment.evaluate.bootstrap, experiment.seed, bundle.ordinal
        ),
    }
    write_metrics(RunPaths(out).metrics, metrics)
    write_reports(Path(out), metrics, predictions)
    return metrics


def explain_bundle(
    bundle: Bundle,
    data: str,
    out: str | Path,
    methods: list[str],
    cases: int | None,
    ids: list[str] | None,
    data_root: str | None,
    split: str,
    lime_samples: int | None,
) -> None:
    """Explanation images + review page in `out` for a bundle's predictions on an experiment's images; `cases` and
    `lime_samples` None take the experiment's `explain.cases` and `explain.lime_samples`. Without `ids`, the split's
    images are the reference rows of a non-linear classifier's surrogate (`tlfusion.explain.decision`)."""
    from tlfusion.explain.cases import explain_cases

    unknown = sorted(set(methods) - set(EXPLAIN_METHODS))
    if unknown or not methods:
        raise InputError(f"--method: unknown method(s) {unknown or methods}; use gradcam, lime or both")
    experiment, table = experiment_rows(data, data_root, split)
    if bundle.task == "multiclass":
        settings = (methods, cases, ids, lime_samples)
        return _explain_class_bundle(bundle, experiment, _class_rows(bundle, table), out, split, *settings)
    table = with_binary_target(table, bundle.class_names[1])
    reference = None
    if ids:
        chosen = _named_rows(table, ids, split)
    else:
        reference = _split_features(bundle, table)
        prob = bundle.probabilities(reference)[:, 1]
        cases = experiment.explain.cases if cases is None else cases
        chosen = pick_cases(table.assign(prob=prob, y_true=table["y"]), bundle.threshold, cases)
    explain_cases(
        bundle,
        chosen["path"].tolist(),
        chosen["y"].tolist(),
        Path(out),
        methods=tuple(methods),
        lime_samples=experiment.explain.lime_samples if lime_samples is None else lime_samples,
        seed=experiment.seed,
        clahe=bundle.clahe,
        reference=reference,
        reference_label=f"images of the {split} split (scored by the model, labels unused)",
    )


def _explain_class_bundle(
    bundle: Bundle,
    experiment: Experiment,
    table: pd.DataFrame,
    out: str | Path,
    split: str,
    methods: list[str],
    cases: int | None,
    ids: list[str] | None,
    lime_samples: int | None,
) -> None:
    """`explain_bundle` for a K-class bundle: cases spread over the confusion cells (`pick_class_cases`)."""
    from tlfusion.evaluation.results import pick_class_cases
    from tlfusion.explain.classes import explain_class_cases

    reference = None
    if ids:
        chosen = _named_rows(table, ids, split)
    else:
        reference = _split_features(bundle, table)
        rows = class_prediction_rows(table, "bundle", split, bundle.probabilities(reference))
        count = experiment.explain.cases if cases is None else cases
        chosen = pick_class_cases(rows, len(bundle.class_names), count).rename(columns={"y_true": "y"})
    explain_class_cases(
        bundle,
        chosen["path"].tolist(),
        chosen["y"].tolist(),
        Path(out),
        methods=tuple(methods),
        lime_samples=experiment.explain.lime_samples if lime_samples is None else lime_samples,
        seed=experiment.seed,
        reference=reference,
        reference_label=f"images of the {split} split (scored by the model, labels unused)",
    )


def _split_features(bundle: Bundle, table: pd.DataFrame) -> np.ndarray:
    """The bundle's features of the table's images (the reference rows of a surrogate)."""
    from tlfusion.data.images import decoded_batches

    batches = decoded_batches(table["path"].tolist(), bundle.image_size, bundle.clahe)
    return np.concatenate([bundle.features(batch) for batch in batches])


def _named_rows(table: pd.DataFrame, ids: list[str], split: str) -> pd.DataFrame:
    """The rows whose path or file name is in `ids`; every id must name one."""
    names = table["path"].map(lambda p: Path(p).name)
    missing = set(ids) - set(table["path"]) - set(names)
    if missing:
        raise InputError(f"--ids: not in the {split} split: {sorted(missing)[:3]}")
    return table[table["path"].isin(ids) | names.isin(ids)]


def load_feature_table(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cached feature table: `.npz` with arrays X, y, groups (no pickled objects)."""
    if not Path(path).is_file():
        raise InputError(f"{path}: feature table not found")
    try:
        with np.load(path, allow_pickle=False) as table:
            return table["X"], table["y"].astype(str), table["groups"].astype(str)
    except (KeyError, ValueError, OSError) as error:
        raise InputError(f"{path}: not a feature table with X, y, groups ({error})") from None


def experiment_features(
    data: str, out: str | Path, data_root: str | None = None, backbone: str | None = None, stages: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, patients) of an experiment's images, extracted (and cached) in run folder `out`."""
    from tlfusion.pipeline import Pipeline

    overrides = ["task=fewshot"]
    if backbone:
        overrides.append(f"backbones=[{{name: {backbone}}}]")
    if stages is not None:
        overrides.append(f"features.stages={stages}")
    experiment = load_experiment(data, overrides, data_root)
    pipeline = Pipeline(experiment, Path(out))
    pipeline.run(until="extract")
    X, _ = pipeline.load_features(pipeline.backbone_keys)
    table = pipeline.table
    return X, table["label"].astype(str).to_numpy(), table["patient"].astype(str).to_numpy()
