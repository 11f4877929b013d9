"""Dataset readers: each turns a dataset layout on disk into one table.

Every reader returns a `pandas.DataFrame` with the columns of `COLUMNS`: `path` (absolute), `label` (class name as
a string; for multi-label sources `labels`, a tuple of findings, with `df.attrs["findings"]` the label space),
`patient`, `study`, `split` ("" when the source defines none) and `region` ("" when unknown); a CSV source's
`extra_columns` and `one_hot_columns`, and `view` where DICOM headers name one, follow. `read_sources` adds `source`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tlfusion.data.dicom import with_dicom_header
from tlfusion.data.files import (
    COLUMNS,
    check_link,
    finish,
    image_files,
    read_table,
    require_columns,
    require_dir,
    require_files,
    resolve_inside,
)
from tlfusion.data.findings import CHESTXRAY14_FINDINGS, read_chestxray14
from tlfusion.errors import InputError

log = logging.getLogger(__name__)

MURA_STUDY = re.compile(r"^(?P<study>study\d+)_(?P<label>positive|negative)$")


MURA_LABELS = {"positive": "abnormal", "negative": "normal"}


def read_mura(root: str | Path, regions: Sequence[str] | None = None, follow_symlinks: bool = False) -> pd.DataFrame:
    """The official MURA-v1.1 layout: `{train,valid}/XR_<REGION>/patientNNNNN/studyN_{positive,negative}/imageN.png`.

    Labels are study-level ("abnormal"/"normal"), taken from the study folder name and cross-checked against
    `*_labeled_studies.csv` where present. `regions` filters by region name (`humerus`, `XR_WRIST`, ...).
    `follow_symlinks` as in `image_files`.
    """
    root = require_dir(root, "mura")
    wanted = {r.lower().removeprefix("xr_") for r in regions} if regions else None
    study_labels = _mura_labeled_studies(root, follow_symlinks)
    rows = []
    for split in ("train", "valid"):
        for region_dir in sorted((root / split).glob("XR_*")) if (root / split).is_dir() else []:
            region = region_dir.name.lower().removeprefix("xr_")
            if wanted is not None and region not in wanted:
                continue
            for study_dir in sorted(region_dir.glob("patient*/*")):
                rows.extend(_mura_study_rows(root, study_dir, split, region, study_labels, follow_symlinks))
    if not rows:
        raise InputError(f"mura: no images under {root}/{{train,valid}}/XR_* (regions={list(regions or [])})")
    return finish(pd.DataFrame(rows, columns=COLUMNS), "mura")


def _mura_labeled_studies(root: Path, follow_symlinks: bool) -> dict[str, str]:
    """Study folder (relative to root, e.g. `train/XR_WRIST/patient1/study1_positive`) -> label, from the CSVs."""
    labels: dict[str, str] = {}
    for csv_path in sorted(root.glob("*_labeled_studies.csv")):
        check_link(csv_path, root, "data.root", follow_symlinks)
        table = read_table(csv_path, header=None, names=["study", "label"])
        for study, label in zip(table["study"], table["label"], strict=True):
            parts = Path(study).parts
            start = next((i for i, p in enumerate(parts) if p in ("train", "valid")), None)
            if start is None or label not in ("0", "1"):
                raise InputError(f"{csv_path}: unexpected row {study!r},{label!r}")
            labels[str(Path(*parts[start:]))] = "abnormal" if label == "1" else "normal"
    return labels


def _mura_study_rows(
    root: Path, study_dir: Path, split: str, region: str, study_labels: dict[str, str], follow_symlinks: bool
) -> list[list]:
    match = MURA_STUDY.match(study_dir.name)
    if not study_dir.is_dir():
        return []
    if match is None:
        raise InputError(f"{study_dir}: MURA study folder without a _positive/_negative label")
    label = MURA_LABELS[match["label"]]
    key = str(Path(split, study_dir.parent.parent.name, study_dir.parent.name, study_dir.name))
    if study_labels and study_labels.get(key, label) != label:
        raise InputError(f"{study_dir}: folder says {label} but labeled_studies CSV says {study_labels[key]}")
    patient = study_dir.parent.name
    study = f"{region}/{patient}/{match['study']}"
    return [[str(p), label, patient, study, split, region] for p in image_files(study_dir, root, follow_symlinks)]


def read_folder(root: str | Path, follow_symlinks: bool = False, patient_pattern: str | None = None) -> pd.DataFrame:
    """One sub-folder per class (images anywhere below it), each image its own study, named by its path below
    `root`. Patients come from `patient_pattern` (`_folder_patient`); without it each image is its own patient
    (also named by its path, so that equal file names in two folders stay apart), which is logged.
    `follow_symlinks` as in `image_files`."""
    root = require_dir(root, "folder")
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for image in image_files(class_dir, root, follow_symlinks):
            name, inside = image.relative_to(root).as_posix(), image.relative_to(class_dir).as_posix()
            patient = name if patient_pattern is None else _folder_patient(inside, patient_pattern, class_dir)
            rows.append([str(image), class_dir.name, patient, name, "", ""])
    table = finish(pd.DataFrame(rows, columns=COLUMNS), f"folder {root}")
    if patient_pattern is None:
        log.info(
            "folder %s: each image is its own patient (set data.patient_pattern to group a patient's images)", root
        )
    return table


def _folder_patient(inside: str, pattern: str, class_dir: Path) -> str:
    """The patient id `pattern` finds in an image's path `inside` its class folder: the group `patient`, else the
    first group, else the whole match; InputError naming the image when it finds none."""
    match = re.search(pattern, inside)
    patient = None
    if match:
        patient = match["patient"] if "patient" in match.re.groupindex else match[1] if match.re.groups else match[0]
    if not patient:
        raise InputError(f"data.patient_pattern {pattern!r}: finds no patient in {inside!r} (in {class_dir})")
    return patient


def read_csv(
    csv: str | Path,
    root: str | Path | None = None,
    path_column: str = "path",
    label_column: str = "label",
    patient_column: str | None = None,
    study_column: str | None = None,
    split_column: str | None = None,
    region_column: str | None = None,
    filters: Mapping[str, str | Sequence[str]] | None = None,
    label_map: Mapping[str, str] | None = None,
    follow_symlinks: bool = False,
    extra_columns: Sequence[str] = (),
    one_hot: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """A CSV with one row per image. Paths resolve against `root` (default: the CSV's folder) and may not leave it
    (through links neither, unless `follow_symlinks`).

    `filters` keeps rows whose column equals a value (or is in a list); `label_map` renames labels and drops rows
    whose label it does not list. Without a patient column each image is its own patient. `extra_columns` are
    kept as they are (for `evaluate.subgroups`); each `one_hot` entry (`{view: [frontal, lateral]}`) becomes a
    column naming its flagged columns (`one_hot_names`).
    """
    csv_path = Path(csv)
    root = Path(root) if root is not None else csv_path.parent
    table = read_table(csv_path)
    columns = [path_column, label_column, patient_column, study_column, split_column, region_column]
    flags = [flag for names in (one_hot or {}).values() for flag in names]
    require_columns(table, [*columns, *(filters or {}), *extra_columns, *flags], csv_path)
    clash = sorted((set(extra_columns) | set(one_hot or {})) & {*COLUMNS, "source"})
    if clash:
        raise InputError(f"{csv_path}: extra_columns / one_hot_columns {clash} would replace the table's own columns")
    table = _apply_filters(table, filters)
    if label_map is not None:
        table = table[table[label_column].isin(label_map)]
    rows = pd.DataFrame(
        {
            "path": [str(resolve_inside(root, p, str(csv_path), follow_symlinks)) for p in table[path_column]],
            "label": table[label_column].map(label_map) if label_map else table[label_column],
        }
    )
    for column, source in (("patient", patient_column), ("study", study_column)):
        rows[column] = table[source].to_numpy() if source else [Path(p).stem for p in rows["path"]]
    for column, source in (("split", split_column), ("region", region_column)):
        rows[column] = table[source].to_numpy() if source else ""
    require_files(rows["path"], csv_path)
    rows = rows[COLUMNS].assign(**{column: table[column].to_numpy() for column in extra_columns})
    for column, names in (one_hot or {}).items():
        rows[column] = one_hot_names(table, names)
    return finish(rows, str(csv_path))


def one_hot_names(table: pd.DataFrame, names: Sequence[str]) -> list[str]:
    """Per row, the `names` of the columns holding a true flag ("1", "true", "yes"), joined by "+" ("" for none)."""
    flagged = table[list(names)].apply(lambda column: column.str.strip().str.lower().isin(("1", "true", "yes")))
    return ["+".join(name for name, on in zip(names, row, strict=True) if on) for row in flagged.to_numpy()]


def _apply_filters(table: pd.DataFrame, filters: Mapping[str, str | Sequence[str]] | None) -> pd.DataFrame:
    for column, wanted in (filters or {}).items():
        values = [wanted] if isinstance(wanted, str) else list(wanted)
        table = table[table[column].isin([str(v) for v in values])]
    return table


CSV_COLUMNS = ("path_column", "label_column", "patient_column", "study_column", "split_column", "region_column")
"""The `config.DataSpec` column keys, passed to `read_csv` under the same names."""


def read_source(spec: Any) -> pd.DataFrame:
    """Read one `config.DataSpec` (format + root + reader options) with the matching reader; a folder or CSV
    source's DICOM files add their header's fields (`dicom.with_dicom_header`), patient and study ids where the
    source gives none."""
    root, follow = Path(spec.root), spec.follow_symlinks
    if spec.format == "mura":
        return read_mura(root, regions=spec.regions, follow_symlinks=follow)
    if spec.format == "folder":
        table = read_folder(root, follow_symlinks=follow, patient_pattern=spec.patient_pattern)
        return with_dicom_header(table, patients=spec.patient_pattern is None, studies=True)
    csv = resolve_inside(root, spec.csv, "data.csv", follow)
    if spec.format == "chestxray14":
        findings = spec.findings or CHESTXRAY14_FINDINGS
        return read_chestxray14(csv, root, findings=findings, follow_symlinks=follow)
    columns = {key: getattr(spec, key) for key in CSV_COLUMNS}
    options = {"extra_columns": spec.extra_columns, "one_hot": spec.one_hot_columns, "follow_symlinks": follow}
    table = read_csv(csv, root, filters=spec.filters, label_map=spec.label_map, **options, **columns)
    return with_dicom_header(table, patients=spec.patient_column is None, studies=spec.study_column is None)


def read_sources(specs: Sequence[Any]) -> pd.DataFrame:
    """Concatenate several sources, each row's `source` the name of its source's root folder; patient and study
    ids are prefixed by source when more than one is read. A column only some sources have is "" in the others."""
    tables = [read_source(spec).assign(source=Path(spec.root).name) for spec in specs]
    if len(tables) == 1:
        return tables[0]
    for number, table in enumerate(tables):
        for column in ("patient", "study"):
            table[column] = f"s{number}:" + table[column].astype(str)
    combined = pd.concat(tables, ignore_index=True)
    extra = [column for column in combined.columns if column not in ("labels",)]
    combined[extra] = combined[extra].fillna("")
    combined.attrs = tables[0].attrs
    return combined


def summarise(table: pd.DataFrame) -> dict[str, Any]:
    """Counts per class, region and split, and patient/study counts: what `tlfusion data` prints. A table with
    file hashes (`sha256`) also counts the images that repeat an earlier one (`identical_image_copies`)."""
    label_column = "label" if "label" in table.columns else "labels"
    labels = table[label_column] if label_column == "label" else table[label_column].explode().fillna("No Finding")
    copies = {"identical_image_copies": int(table["sha256"].duplicated().sum())} if "sha256" in table.columns else {}
    return {
        "images": len(table),
        "patients": int(table["patient"].nunique()),
        "studies": int(table["study"].nunique()),
        "classes": labels.value_counts().sort_index().to_dict(),
        "regions": table["region"].replace("", "(none)").value_counts().sort_index().to_dict(),
        "splits": table["split"].replace("", "(none)").value_counts().sort_index().to_dict(),
        "patients_per_class": table.explode(label_column).groupby(label_column)["patient"].nunique().to_dict()
        if label_column == "label"
        else {},
        **copies,
    }
