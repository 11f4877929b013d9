"""Readers, decoding and splits on layout-faithful fixtures, and the bad-input list."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from tests.conftest import SHARED_DATA, write_dicom, write_png, xray_like
from tlfusion.config.pretraining import PretrainSource, PretrainSplit
from tlfusion.data import findings as data_findings
from tlfusion.data import images, sources, splits
from tlfusion.data.pretraining import pretraining_table
from tlfusion.errors import InputError

# ----------------------------------------------------------------------------- decoding


def test_8bit_png_round_trip(tmp_path):
    pixels = xray_like(0, 40)
    gray = images.read_gray(write_png(tmp_path / "a.png", pixels))
    assert gray.dtype == np.float32 and np.array_equal(gray, pixels.astype(np.float32))


def test_16bit_png_is_scaled_to_full_range(tmp_path):
    pixels = (np.arange(64 * 32).reshape(32, 64) * 7 + 1000).astype(np.uint16)
    gray = images.read_gray(write_png(tmp_path / "deep.png", pixels))
    linear = (pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255.0
    assert gray.shape == (32, 64) and np.allclose(gray, linear, atol=1e-3)  # min -> 0, max -> 255, linear between


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :5, 3] = 255  # left half opaque, right half transparent
    gray = images.read_gray(write_png(tmp_path / "rgba.png", rgba))
    assert gray[:, :5].mean() == pytest.approx(200, abs=1) and gray[:, 5:].max() == 0


def test_jpeg_and_palette_png(tmp_path):
    from PIL import Image

    jpeg, photo = tmp_path / "x.jpg", xray_like(1, 32)
    cv2.imwrite(str(jpeg), photo)
    palette, grey = tmp_path / "p.png", xray_like(2, 32)
    Image.fromarray(grey).convert("P").save(palette)
    assert np.abs(images.read_gray(jpeg) - photo).max() <= 4  # lossy, but the same picture
    assert np.array_equal(images.read_gray(palette), grey.astype(np.float32))  # palette indices mapped to grey


def test_dicom_monochrome1_is_inverted(tmp_path):
    ramp = np.tile(np.arange(0, 4000, 125, dtype=np.uint16), (16, 1))  # dark left, bright right in raw values
    normal = images.read_gray(write_dicom(tmp_path / "m2.dcm", ramp, RescaleSlope=2.0, RescaleIntercept=0))
    inverted = images.read_gray(write_dicom(tmp_path / "m1.dcm", ramp, "MONOCHROME1"))
    assert normal[0, 0] < normal[0, -1] and inverted[0, 0] > inverted[0, -1]
    assert normal.max() == pytest.approx(255, abs=1e-3) and inverted.min() == pytest.approx(0, abs=1e-3)


@pytest.mark.parametrize("content", [b"", b"this is not an image\n"], ids=["zero-byte", "text-named-png"])
def test_unreadable_files_name_the_file(tmp_path, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(InputError, match="bad.png"):
        images.read_gray(bad)


def test_truncated_png_is_refused(tmp_path):
    good = write_png(tmp_path / "good.png", xray_like(3, 64))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match="truncated.png"):
        images.read_gray(truncated)


def test_tiny_and_huge_images_resize_to_the_square(tmp_path):
    one = write_png(tmp_path / "one.png", np.full((1, 1), 128, np.uint8))
    huge = write_png(tmp_path / "huge.png", np.zeros((10000, 10000), np.uint8))
    assert images.load_image(one, 32).shape == (32, 32, 1)
    assert images.load_image(huge, 32).shape == (32, 32, 1)


def test_resize_keeps_aspect_and_pads_centred():
    wide = np.full((10, 40), 255, np.float32)
    square = images.resize_pad(wide, 40)
    assert square.shape == (40, 40)
    assert square[:14].max() == 0 and square[16:24].min() == 255 and square[26:].max() == 0


def test_clahe_raises_local_contrast():
    flat = np.tile(np.linspace(100, 110, 64, dtype=np.float32), (64, 1))
    assert np.ptp(images.apply_clahe(flat)) > np.ptp(flat)


def test_image_dataset_batches_in_order(tmp_path):
    paths = [str(write_png(tmp_path / f"{i}.png", np.full((8, 8), i * 20, np.uint8))) for i in range(5)]
    batches = list(images.image_dataset(paths, 8, batch_size=2).as_numpy_iterator())
    stacked = np.concatenate(batches)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert np.allclose(stacked[:, 0, 0, 0], [0, 20, 40, 60, 80])


def test_decoded_batches_match_load_batch_in_order(tmp_path):
    paths = [str(write_png(tmp_path / f"{i}.png", np.full((8, 6), i * 20, np.uint8))) for i in range(7)]
    batches = list(images.decoded_batches(paths, 8, batch_size=3, prefetch=1))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images.load_batch(paths, 8))


def test_decoded_batches_name_an_unreadable_file(tmp_path):
    good = str(write_png(tmp_path / "good.png", np.zeros((8, 8), np.uint8)))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="bad.png"):
        list(images.decoded_batches([good, good, str(tmp_path / "bad.png")], 8, batch_size=1))


def test_scan_images_skip_bad(tmp_path):
    good = str(write_png(tmp_path / "good.png", xray_like(0, 16)))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    with pytest.raises(InputError, match="bad.png"):
        images.scan_images([good, str(bad)])
    hashes, skipped = images.scan_images([good, str(bad)], skip_bad=True)
    assert len(hashes[0]) == 64 and hashes[1] == "" and skipped[0][0] == str(bad)


# ----------------------------------------------------------------------------- readers


def test_mura_reader_labels_patients_and_regions(mura_tree):
    table = sources.read_mura(mura_tree, regions=["humerus"])
    assert list(table.columns) == sources.COLUMNS
    assert set(table["region"]) == {"humerus"} and set(table["split"]) == {"train", "valid"}
    assert set(table["label"]) == {"abnormal", "normal"}
    assert table.groupby("study")["label"].nunique().max() == 1
    assert len(table) == 2 * 6 * 2 * 2  # splits x patients x studies x images


def test_mura_study_without_label_is_refused(mura_tree):
    write_png(mura_tree / "train/XR_HUMERUS/patient00001/study9/image1.png", xray_like(0, 16))
    with pytest.raises(InputError, match="study9"):
        sources.read_mura(mura_tree)


def test_mura_csv_disagreeing_with_folder_is_refused(mura_tree):
    csv = mura_tree / "train_labeled_studies.csv"
    csv.write_text(csv.read_text().replace("study1_positive/,1", "study1_positive/,0", 1))
    with pytest.raises(InputError, match="labeled_studies"):
        sources.read_mura(mura_tree)


def test_folder_reader(folder_dataset, caplog):
    with caplog.at_level("INFO", logger="tlfusion"):
        table = sources.read_folder(folder_dataset)
    assert table["label"].value_counts().to_dict() == {"abnormal": 12, "normal": 12}
    assert table["patient"].nunique() == 24
    assert "each image is its own patient (set data.patient_pattern" in caplog.text


def _patient_folders(root: Path) -> Path:
    """`root/<class>/p<N>/<view>.png` and `root/<class>/p<N>_<view>.png`: 6 patients per class, 3 images each."""
    for label, first in (("normal", 0), ("abnormal", 6)):
        for patient in range(first, first + 6):
            for view in range(3):
                name = f"p{patient}/{view}.png" if patient % 2 else f"p{patient}_{view}.png"
                write_png(root / label / name, xray_like(patient * 3 + view, 16, label == "abnormal"))
    return root


@pytest.mark.parametrize("pattern", [r"^(p\d+)[/_]", r"(?P<patient>p\d+)", r"^p\d+"])
def test_folder_patient_pattern_groups_a_patients_images_in_one_part(tmp_path, pattern):
    root = _patient_folders(tmp_path / "data")
    table = sources.read_folder(root, patient_pattern=pattern)
    assert sorted(table["patient"].unique()) == sorted(f"p{i}" for i in range(12))
    parts = splits.assign_splits(table, test_fraction=0.34, val_fraction=0.25, seed=0)
    assert parts.groupby("patient")["split"].nunique().max() == 1  # each patient's 3 images in one part
    ungrouped = splits.assign_splits(sources.read_folder(root), test_fraction=0.34, val_fraction=0.25, seed=0)
    assert ungrouped.assign(p=table["patient"]).groupby("p")["split"].nunique().max() > 1  # the leak it prevents


def test_folder_patient_pattern_that_finds_no_patient_names_the_image(tmp_path):
    root = _patient_folders(tmp_path / "data")
    write_png(root / "normal" / "scan.png", xray_like(0, 16))
    with pytest.raises(InputError, match=r"data.patient_pattern '\^p\[0-9\]\+': finds no patient in 'scan.png'"):
        sources.read_folder(root, patient_pattern="^p[0-9]+")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"format": "folder", "root": ".", "patient_pattern": "p(\\d"}, "not a regular expression"),
        ({"format": "csv", "root": ".", "csv": "x.csv", "patient_pattern": "p"}, "patient_pattern is for format"),
    ],
)
def test_folder_patient_pattern_is_checked_in_the_experiment(data, message):
    from tlfusion.config.experiment import DataSpec

    with pytest.raises(ValueError, match=message):
        DataSpec(**data)


def _csv_dataset(tmp_path: Path, rows: list[dict]) -> Path:
    for row in rows:
        write_png(tmp_path / row["file"], xray_like(len(row["file"]), 16))
    csv = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def test_csv_reader_groups_filters_and_maps(tmp_path):
    rows = [
        {
            "file": f"img/{i}.png",
            "finding": ["COVID-19", "No finding", "unknown"][i % 3],
            "pid": f"p{i // 2}",
            "site": "a" if i < 6 else "b",
        }
        for i in range(9)
    ]
    csv = _csv_dataset(tmp_path, rows)
    table = sources.read_csv(
        csv,
        path_column="file",
        label_column="finding",
        patient_column="pid",
        filters={"site": "a"},
        label_map={"COVID-19": "covid", "No finding": "normal"},
    )
    assert set(table["label"]) == {"covid", "normal"} and len(table) == 4
    assert table["patient"].tolist() == ["p0", "p0", "p1", "p2"]


@pytest.mark.parametrize(
    ("path_column", "label_column", "missing"), [("path", "finding", "path"), ("file", "label", "label")]
)
def test_csv_missing_column_is_named(tmp_path, path_column, label_column, missing):
    csv = _csv_dataset(tmp_path, [{"file": "a.png", "finding": "x"}])
    with pytest.raises(InputError, match=f"missing column.*'{missing}'"):
        sources.read_csv(csv, path_column=path_column, label_column=label_column)


def test_csv_path_escaping_root_is_refused(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n../../etc/passwd,1\n")
    with pytest.raises(InputError, match="escapes the data root"):
        sources.read_csv(csv)


def test_chestxray14_reader_by_image_index_and_official_lists(tmp_path):
    names = [f"0000000{i}_000.png" for i in range(4)]
    for i, name in enumerate(names):
        write_png(tmp_path / f"images_00{i % 2 + 1}" / "images" / name, xray_like(i, 16))
    findings = ["Effusion|Mass", "No Finding", "Cardiomegaly", "Mass"]
    pd.DataFrame({"Image Index": names, "Finding Labels": findings, "Patient ID": ["1", "1", "2", "3"]}).to_csv(
        tmp_path / "Data_Entry_2017.csv", index=False
    )
    (tmp_path / "train_val_list.txt").write_text("\n".join(names[:3]))
    (tmp_path / "test_list.txt").write_text(names[3])
    table = data_findings.read_chestxray14(tmp_path / "Data_Entry_2017.csv")
    assert table["labels"].tolist() == [("Effusion", "Mass"), (), ("Cardiomegaly",), ("Mass",)]
    assert table["split"].tolist() == ["train", "train", "train", "test"]
    matrix = data_findings.label_matrix(table, table.attrs["findings"])
    assert matrix.shape == (4, 14) and matrix.sum() == 4


def test_chestxray14_unknown_finding_is_refused(tmp_path):
    write_png(tmp_path / "a.png", xray_like(0, 16))
    pd.DataFrame({"path": ["a.png"], "Finding Labels": ["Broken Heart"], "Patient ID": ["1"]}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    with pytest.raises(InputError, match="Broken Heart"):
        sources.read_chestxray14(tmp_path / "labels.csv")


# ----------------------------------------------------------------------------- splits


def _table(n_patients: int = 40, images_per_patient: int = 3) -> pd.DataFrame:
    rows = [
        {
            "path": f"{p}_{i}.png",
            "label": "pos" if p % 2 else "neg",
            "patient": f"p{p}",
            "study": f"p{p}",
            "split": "",
            "region": "",
        }
        for p in range(n_patients)
        for i in range(images_per_patient)
    ]
    return pd.DataFrame(rows)


def test_assign_splits_is_grouped_stratified_and_repeatable():
    first = splits.assign_splits(_table(), test_fraction=0.2, val_fraction=0.25, seed=3)
    again = splits.assign_splits(_table(), test_fraction=0.2, val_fraction=0.25, seed=3)
    assert first["split"].tolist() == again["split"].tolist()
    assert first.groupby("patient")["split"].nunique().max() == 1
    test = first[first["split"] == "test"]
    assert 0.15 < len(test) / len(first) < 0.25 and test["label"].nunique() == 2


def test_assign_splits_uses_official_test_split():
    table = _table()
    table.loc[table["patient"].isin([f"p{i}" for i in range(8)]), "split"] = "valid"
    split = splits.assign_splits(table, test_values=("valid",), val_fraction=0.2)
    assert set(split.loc[split["split"] == "test", "patient"]) == {f"p{i}" for i in range(8)}


def test_identical_images_under_different_patients_share_a_part_and_the_rest_is_unchanged():
    table = _table(images_per_patient=1).assign(sha256=lambda t: t["path"])
    plain = splits.assign_splits(table.drop(columns="sha256"), test_fraction=0.2, val_fraction=0.25, seed=3)
    tested, trained = plain.index[plain["split"] == "test"][:2], plain.index[plain["split"] == "train"][:2]
    table.loc[tested, "sha256"] = table.loc[trained, "sha256"].to_numpy()  # two test images copy train ones
    joined = splits.assign_splits(table, test_fraction=0.2, val_fraction=0.25, seed=3)
    assert (joined.loc[tested, "split"] == "train").all()
    others = table.index.difference(tested)
    assert joined.loc[others, "split"].tolist() == plain.loc[others, "split"].tolist()


def test_summary_counts_identical_image_copies():
    table = _table(n_patients=4, images_per_patient=1).assign(split="train")
    assert "identical_image_copies" not in sources.summarise(table)
    assert sources.summarise(table.assign(sha256=["x", "y", "x", "x"]))["identical_image_copies"] == 2


def test_content_groups_join_patients_through_shared_images():
    table = pd.DataFrame({"patient": ["a", "b", "c", "d", "e"], "sha256": ["x", "y", "x", "z", "y"]})
    assert splits.content_groups(table).tolist() == ["a", "b", "a", "d", "b"]
    chained = pd.DataFrame({"patient": ["a", "a", "b", "c"], "sha256": ["x", "y", "y", "x"]})
    assert splits.content_groups(chained).tolist() == ["a", "a", "a", "a"]
    assert splits.content_groups(table.drop(columns="sha256")).tolist() == ["a", "b", "c", "d", "e"]


def test_leakage_check_refuses_shared_patient():
    table = _table().assign(split="train")
    table.loc[0, "split"] = "test"
    with pytest.raises(InputError, match="more than one split"):
        splits.check_no_leakage(table)


def test_one_class_labels_are_refused():
    with pytest.raises(InputError, match="only one class"):
        splits.assign_splits(_table().assign(label="pos"))


# ----------------------------------------------------------------------------- the real data (slow)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_shared_datasets_read_and_summarise():
    kermany = sources.read_csv(SHARED_DATA / "kermany_pneumonia/labels.csv", patient_column="patient_key")
    fracatlas = sources.read_csv(
        SHARED_DATA / "fracatlas/dataset.csv", label_column="fractured", region_column="primary_region"
    )
    nih = sources.read_chestxray14(SHARED_DATA / "nih1000/labels.csv")
    assert sources.summarise(kermany)["classes"] == {"NORMAL": 403, "PNEUMONIA": 450}
    assert sources.summarise(fracatlas)["regions"]["hand"] == 779
    assert sources.summarise(nih)["patients"] == 264


def test_pretraining_table_combines_sources_and_drops_test_rows(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(40):
        cv2.imwrite(str(tmp_path / f"{i}.png"), rng.integers(0, 255, (8, 8), dtype=np.uint8))
        rows.append({"path": f"{i}.png", "fractured": str(i % 2), "primary_region": ["leg", "hand"][i % 4 // 2]})
    pd.DataFrame(rows).to_csv(tmp_path / "dataset.csv", index=False)
    source = PretrainSource(
        name="fa",
        csv="dataset.csv",
        label_column="fractured",
        region_column="primary_region",
        regions=["leg"],
        class_names={"0": "normal", "1": "fractured"},
    )

    combined = pretraining_table([source], tmp_path, PretrainSplit(seed=0))

    assert set(combined["label"]) == {"fa/leg/normal", "fa/leg/fractured"}
    assert set(combined["split"]) == {"train", "val"} and len(combined) == 16  # 20 leg rows minus 4 test rows
