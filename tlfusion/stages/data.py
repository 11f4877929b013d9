"""The data stage: the experiment's images read, scanned, given a target and split into data/table.csv."""

from __future__ import annotations

import logging

import pandas as pd

from tlfusion.data.table import class_order, scan_with_cache, split_table, with_binary_target, with_class_codes
from tlfusion.fileio import write_atomic, write_json
from tlfusion.stages.context import RunContext

log = logging.getLogger("tlfusion")


def run_data(run: RunContext) -> None:
    """data/table.csv: the experiment's readable images, their target (binary or class code), split and (joined)
    patient."""
    from tlfusion.data.sources import read_sources, summarise
    from tlfusion.data.splits import content_groups
    from tlfusion.evaluation.subgroups import check_columns

    experiment = run.experiment
    table = _scanned(run, read_sources(experiment.data))
    check_columns(table, experiment.evaluate.subgroups)  # before any backbone is trained for nothing
    if experiment.task == "binary":
        table = with_binary_target(table, experiment.positive_class)
    elif experiment.task == "multiclass":
        table = with_class_codes(table, class_order(table["label"], experiment.classes))
    table = split_table(table, experiment.split, experiment.seed)
    # Identical files under two patients are one patient from here on: CV folds, bootstrap and episodes.
    table["patient"] = content_groups(table)
    if "labels" in table.columns:
        table["labels"] = table["labels"].map("|".join)
    write_atomic(run.paths.table, lambda temp: table.to_csv(temp, index=False))
    summary = summarise(table if "label" in table.columns else table.assign(labels=table["labels"].str.split("|")))
    write_json(run.paths.data_summary, summary)
    run.table = table
    log.info("data: %d images, %d patients, splits %s", summary["images"], summary["patients"], summary["splits"])


def _scanned(run: RunContext, table: pd.DataFrame) -> pd.DataFrame:
    """`table` with each image's sha256, unreadable images left out (with --skip-bad) and listed."""
    hashes, bad = scan_with_cache(table["path"].tolist(), run.paths.scan_cache, run.skip_bad)
    table = table.assign(sha256=hashes)
    if bad:
        write_json(run.paths.skipped, [{"path": p, "reason": r} for p, r in bad])
        log.warning("skipped %d unreadable image(s), listed in data/skipped.json", len(bad))
    return table[table["sha256"] != ""].reset_index(drop=True)
