"""Dataset readers: each turns a dataset layout on disk into one table.

Every reader returns a `pandas.DataFrame` with the columns of `COLUMNS`: `path` (absolute), `label` (class name as
a string; for multi-label sources `labels`, a tuple of findings, with `df.attrs["findings"]` the label space),
`patient`, `study`, `split` ("" when the source defines none) and `region` ("" when unknown); a CSV source's
`extra_columns` and `one_hot_columns`, and `view` where DICOM headers name one, follow. `read_sources` adds `source`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlfusion.data.dicom import is_dicom_file, with_dicom_header
from tlfusion.data.images import IMAGE_SUFFIXES, read_regular
from tlfusion.errors import InputError

log = logging.getLogger(__name__)

COLUMNS = ["path", "label", "patient", "study", "split", "region"]
MURA_STUDY = re.compile(r"^(?P<study>study\d+)_(?P<label>positive|negative)$")
MURA_LABELS = {"positive": "abnormal", "negative": "normal"}
CHESTXRAY14_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NO_FINDING = "No Finding"


def resolve_inside(root: Path, relative: str, what: str, follow_symlinks: bool = False) -> Path:
    """`root / relative` as an absolute path, refusing one that escapes `root` (e.g. `../../etc/passwd`), and, unless
    `follow_symlinks`, one whose links lead out of it."""
    path = Path(os.path.abspath(root / relative))
    if not path.is_relative_to(os.path.abspath(root)):
        raise InputError(f"{what}: path {relative!r} escapes the data root {root}")
    _check_link(path, root, what, follow_symlinks)
    return path


def _check_link(path: Path, root: Path, what: str, follow_symlinks: bool) -> None:
    """Refuse a path inside `root` whose links lead out of it, unless `follow_symlinks` (`data.follow_symlinks`)."""
    if not _inside(path, root, follow_symlinks):
        raise InputError(
            f"{what}: {path} links outside the data root {root} (to {os.path.realpath(path)}); "
            "set data.follow_symlinks: true to read it"
        )


def image_files(folder: Path, root: Path | None = None, follow_symlinks: bool = False) -> list[Path]:
    """Every entry under `folder` whose name has an image suffix, and every regular file that starts like a DICOM
    file whatever its name (`dicom.is_dicom_file`), sorted, with its path inside the data set.

    Entries with an image suffix that are not regular files (folders named `*.png`, FIFOs, devices, dangling links)
    are listed too, so that decoding refuses them by name. Unless `follow_symlinks`, a link out of `root` (default:
    `folder`) is an error for a name with an image suffix (and, for any other name, not read to look for DICOM), and
    linked folders are not entered (one inside the root holds files listed under their own path); with it, linked
    folders are entered once each.
    """
    root = Path(root or folder)
    _check_link(folder, root, "data.root", follow_symlinks)
    found, entered = [], set()
    for top, folders, names in os.walk(folder, followlinks=follow_symlinks):
        if follow_symlinks and os.path.realpath(top) in entered:
            folders.clear()
            continue
        entered.add(os.path.realpath(top))
        for name in sorted(folders + names):
            path = Path(top, name)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                _check_link(path, root, "data.root", follow_symlinks)
                found.append(path)
            elif _inside(path, root, follow_symlinks) and is_dicom_file(path):
                found.append(path)
    return sorted(found)


def _inside(path: Path, root: Path, follow_symlinks: bool) -> bool:
    """Whether `path` may be read: it leads to a file inside `root`, or links are followed."""
    return follow_symlinks or Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def _require_dir(root: str | Path, what: str) -> Path:
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise InputError(f"{what}: data folder not found: {root}")
    return root


def _read_table(csv_path: Path, **options: Any) -> pd.DataFrame:
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: {'not a regular file' if csv_path.exists() else 'file not found'}")
    try:
        return pd.read_csv(csv_path, dtype=str, keep_default_na=False, **options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"{csv_path}: not a readable CSV ({error})") from None


def _require_columns(table: pd.DataFrame, columns: Iterable[str | None], csv_path: Path) -> None:
    missing = [column for column in columns if column and column not in table.columns]
    if missing:
        raise InputError(f"{csv_path}: missing column(s) {missing}; columns are {list(table.columns)}")


def _finish(rows: pd.DataFrame, what: str) -> pd.DataFrame:
    if rows.empty:
        raise InputError(f"{what}: no images found")
    return rows.reset_index(drop=True)


def read_mura(root: str | Path, regions: Sequence[str] | None = None, follow_symlinks: bool = False) -> pd.DataFrame:
    """The official MURA-v1.1 layout: `{train,valid}/XR_<REGION>/patientNNNNN/studyN_{positive,negative}/imageN.png`.

    Labels are study-level ("abnormal"/"normal"), taken from the study folder name and cross-checked against
    `*_labeled_studies.csv` where present. `regions` filters by region name (`humerus`, `XR_WRIST`, ...).
    `follow_symlinks` as in `image_files`.
    """
    root = _require_dir(root, "mura")
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
    return _finish(pd.DataFrame(rows, columns=COLUMNS), "mura")


def _mura_labeled_studies(root: Path, follow_symlinks: bool) -> dict[str, str]:
    """Study folder (relative to root, e.g. `train/XR_WRIST/patient1/study1_positive`) -> label, from the CSVs."""
    labels: dict[str, str] = {}
    for csv_path in sorted(root.glob("*_labeled_studies.csv")):
        _check_link(csv_path, root, "data.root", follow_symlinks)
        table = _read_table(csv_path, header=None, names=["study", "label"])
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
    root = _require_dir(root, "folder")
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for image in image_files(class_dir, root, follow_symlinks):
            name, inside = image.relative_to(root).as_posix(), image.relative_to(class_dir).as_posix()
            patient = name if patient_pattern is None else _folder_patient(inside, patient_pattern, class_dir)
            rows.append([str(image), class_dir.name, patient, name, "", ""])
    table = _finish(pd.DataFrame(rows, columns=COLUMNS), f"folder {root}")
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
    table = _read_table(csv_path)
    columns = [path_column, label_column, patient_column, study_column, split_column, region_column]
    flags = [flag for names in (one_hot or {}).values() for flag in names]
    _require_columns(table, [*columns, *(filters or {}), *extra_columns, *flags], csv_path)
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
    _require_files(rows["path"], csv_path)
    rows = rows[COLUMNS].assign(**{column: table[column].to_numpy() for column in extra_columns})
    for column, names in (one_hot or {}).items():
        rows[column] = one_hot_names(table, names)
    return _finish(rows, str(csv_path))


def one_hot_names(table: pd.DataFrame, names: Sequence[str]) -> list[str]:
    """Per row, the `names` of the columns holding a true flag ("1", "true", "yes"), joined by "+" ("" for none)."""
    flagged = table[list(names)].apply(lambda column: column.str.strip().str.lower().isin(("1", "true", "yes")))
    return ["+".join(name for name, on in zip(names, row, strict=True) if on) for row in flagged.to_numpy()]


def _apply_filters(table: pd.DataFrame, filters: Mapping[str, str | Sequence[str]] | None) -> pd.DataFrame:
    for column, wanted in (filters or {}).items():
        values = [wanted] if isinstance(wanted, str) else list(wanted)
        table = table[table[column].isin([str(v) for v in values])]
    return table


def _require_files(paths: Iterable[str], csv_path: Path) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"{csv_path}: image listed but not found: {path}")


def read_chestxray14(
    csv: str | Path,
    root: str | Path | None = None,
    findings: Sequence[str] = CHESTXRAY14_FINDINGS,
    split_lists: bool = True,
    follow_symlinks: bool = False,
) -> pd.DataFrame:
    """`Data_Entry_2017.csv`-style multi-label findings (`Finding Labels` joined by `|`).

    Images are found through a `path` column when present, else by `Image Index` anywhere under `root`
    (the official release spreads them over `images_0NN/images/`). The official `train_val_list.txt` /
    `test_list.txt` beside the CSV set `split` when `split_lists` is on and they exist. Paths stay inside `root`
    (through links too, unless `follow_symlinks`).
    """
    csv_path = Path(csv)
    root = Path(root) if root is not None else csv_path.parent
    table = _read_table(csv_path)
    _require_columns(table, ["Finding Labels", "Patient ID"], csv_path)
    labels = [_parse_findings(text, findings, csv_path) for text in table["Finding Labels"]]
    if "path" in table.columns:
        paths = [str(resolve_inside(root, p, str(csv_path), follow_symlinks)) for p in table["path"]]
    else:
        _require_columns(table, ["Image Index"], csv_path)
        index = {p.name: str(p) for p in image_files(Path(os.path.abspath(root)), follow_symlinks=follow_symlinks)}
        missing = [name for name in table["Image Index"] if name not in index]
        if missing:
            raise InputError(f"{csv_path}: {len(missing)} images not found under {root}, e.g. {missing[0]}")
        paths = [index[name] for name in table["Image Index"]]
    rows = pd.DataFrame({"path": paths, "labels": labels, "patient": table["Patient ID"].to_numpy()})
    rows["study"] = [Path(p).stem for p in paths]
    rows["split"] = _official_split(csv_path.parent, [Path(p).name for p in paths]) if split_lists else ""
    rows["region"] = "chest"
    _require_files(rows["path"], csv_path)
    rows = _finish(rows, str(csv_path))
    rows.attrs["findings"] = list(findings)
    return rows


def _parse_findings(text: str, findings: Sequence[str], csv_path: Path) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split("|") if name.strip() and name.strip() != NO_FINDING)
    unknown = [name for name in names if name not in findings]
    if unknown:
        raise InputError(f"{csv_path}: unknown finding(s) {unknown} in 'Finding Labels'; known: {list(findings)}")
    return names


def _official_split(folder: Path, names: list[str]) -> list[str]:
    """Each image's official split ("train" / "test", "" when unlisted); none when both lists are absent. One list
    without the other, or one that is not a regular UTF-8 text file, raises InputError naming it (never read)."""
    lists = {"train": folder / "train_val_list.txt", "test": folder / "test_list.txt"}
    present = [path for path in lists.values() if path.exists() or path.is_symlink()]
    if not present:
        return [""] * len(names)
    membership: dict[str, str] = {}
    for split, path in lists.items():
        if path not in present:
            raise InputError(f"{path}: missing beside {present[0].name}; add it or set split_lists: false")
        membership.update((name, split) for name in _list_text(path).split())
    return [membership.get(name, "") for name in names]


def _list_text(path: Path) -> str:
    try:
        return read_regular(path).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None


def label_matrix(table: pd.DataFrame, findings: Sequence[str]) -> np.ndarray:
    """0/1 matrix [n_images, n_findings] from a multi-label table's `labels` column: lists of findings, or text
    joined by '|' as `data/table.csv` stores them (empty or missing: no finding)."""
    rows = [labels.split("|") if isinstance(labels, str) else labels for labels in table["labels"]]
    rows = [row if isinstance(row, (list, tuple)) else [] for row in rows]
    return np.array([[name in row for name in findings] for row in rows], dtype=np.float32)


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
