"""Rebuild the bundled demo sample, tlfusion/demo/sample (package data; data/sample links to it), from the CC BY 4.0
sets in ../shared/data (run from the repository root).

Kermany images come only from the held-out TEST part of the grouped split that the experiments and the shipped
in-domain backbones use (seed 0, 20% of patients), so the demo never evaluates on images a shipped backbone saw.
FracAtlas hand images were never used for pretraining at all.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd

from tlfusion.data.sources import read_csv
from tlfusion.data.splits import assign_splits

PER_CLASS = {"kermany": 60, "fracatlas_hand": 40}


def main(shared: Path = Path("../shared/data"), out: Path = Path("tlfusion/demo/sample")) -> None:
    kermany = read_csv(shared / "kermany_pneumonia/labels.csv", patient_column="patient_key")
    kermany = assign_splits(kermany, test_fraction=0.2, val_fraction=0.2, seed=0)
    kermany = kermany[kermany["split"] == "test"].drop_duplicates("patient")
    hand = read_csv(
        shared / "fracatlas/dataset.csv",
        label_column="fractured",
        region_column="primary_region",
        filters={"primary_region": "hand"},
    )
    hand["label"] = hand["label"].map({"0": "non_fractured", "1": "fractured"})
    rows = []
    for source, table in (("kermany", kermany), ("fracatlas_hand", hand)):
        for label, group in table.groupby("label"):
            for _, row in group.sample(PER_CLASS[source], random_state=0).iterrows():
                target = out / source / label / Path(row["path"]).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(row["path"], target)
                rows.append(
                    {"path": str(target.relative_to(out)), "label": label, "patient": row["patient"], "source": source}
                )
    pd.DataFrame(rows).to_csv(out / "labels.csv", index=False)


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:]))
