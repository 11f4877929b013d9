"""The Python API (`tlfusion.load_bundle`, `run_experiment`, `FeatureFusion`) and what `import tlfusion` loads."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

import tlfusion
from tests.conftest import write_png, xray_like
from tlfusion.config import names
from tlfusion.errors import InputError

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "image.size=32",
    "backbones=[{name: mobilenetv2, options: {alpha: 0.35}}]",
    "finetune.enabled=false",
    "features.engine=keras",
    "classifiers.models=[lr]",
    "classifiers.cv=2",
    "evaluate.bootstrap=20",
    "explain.enabled=false",
]


def python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_registry_names_equal_the_registries():
    from tlfusion.backbones.registry import REGISTRY
    from tlfusion.fewshot.evaluation import FEWSHOT_CLASSIFIERS
    from tlfusion.models.classifiers import CLASSIFIERS
    from tlfusion.semantic.metric_learning import LOSSES

    assert tuple(REGISTRY) == names.BACKBONES and tuple(CLASSIFIERS) == names.CLASSIFIERS
    assert tuple(FEWSHOT_CLASSIFIERS) == names.FEWSHOT_CLASSIFIERS and LOSSES == names.LOSSES


def test_import_and_config_validation_load_no_tensorflow():
    done = python(
        """
        import sys, tlfusion
        from tlfusion.config.experiment import load_experiment
        load_experiment("experiments/demo.yaml", ["features.engine=keras"])
        heavy = sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "keras", "sklearn", "xgboost"})
        print(heavy, sorted(tlfusion.__all__))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0].startswith("[] ") and "'load_bundle'" in done.stdout
    assert done.stderr == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "experiments/demo.yaml", "--set", "finetune.epochz=1"],
        ["evaluate", "nowhere", "--data", "experiments/demo.yaml", "--data-root", "nowhere", "--out", "x"],
    ],
)
def test_a_config_error_exits_2_before_tensorflow_is_imported(argv):
    done = python(
        f"""
        import sys
        from tlfusion.cli import main
        code = main({argv!r})
        print("tensorflow" in sys.modules)
        sys.exit(code)
        """
    )
    assert (done.returncode, done.stdout) == (2, "False\n")
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("tlfusion: error: ")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny folder data set run through `tlfusion.run_experiment`."""
    folder = tmp_path_factory.mktemp("api")
    for label, blob in (("normal", False), ("abnormal", True)):
        for i in range(12):
            write_png(folder / "data" / label / f"{label}{i}.png", xray_like(i + 100 * blob, bright_blob=blob))
    out = tlfusion.run_experiment(
        REPO / "experiments" / "own_folder.yaml", folder / "run", TINY_RUN, data_root=folder / "data"
    )
    assert out == folder / "run"
    return out


def test_run_experiment_runs_the_pipeline_like_the_command(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["selected"] == "mobilenetv2/lr" and metrics["data"]["images"] == 24
    assert (tiny_run / "report.html").is_file() and (tiny_run / "bundle" / "manifest.json").is_file()


def test_readme_example_predicts_on_a_numpy_array(tiny_run):
    section = (REPO / "README.md").read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert code.count("\n") == 5 and '"runs/demo/bundle"' in code
    printed = io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(printed):
        exec(code.replace('"runs/demo/bundle"', repr(str(tiny_run / "bundle"))), {})  # noqa: S102
    printed_line = next(line for line in printed.getvalue().splitlines() if line.startswith("["))  # logs aside
    classes, probabilities = printed_line.split("] ", 1)
    assert classes == "['normal' 'abnormal'"
    row = np.array(probabilities.strip(" []\n").split(), float)
    assert row.shape == (2,) and abs(row.sum() - 1) < 1e-6


@pytest.fixture(scope="module")
def model(tiny_run):
    return tlfusion.load_bundle(tiny_run / "bundle")


def test_paths_arrays_and_stacks_give_the_same_probabilities(model, tmp_path):
    images = [xray_like(seed, 40, bright_blob=seed % 2 == 1)[:, 5:] for seed in range(3)]  # 40 x 35: letterboxed
    paths = [str(write_png(tmp_path / f"{i}.png", image)) for i, image in enumerate(images)]
    from_paths = model.predict_proba(paths)
    assert from_paths.shape == (3, 2) and np.allclose(from_paths.sum(axis=1), 1)
    np.testing.assert_allclose(model.predict_proba(images), from_paths, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict_proba(np.stack(images)), from_paths, rtol=1e-5, atol=1e-6)
    floats = [image.astype(np.float64) for image in images]
    np.testing.assert_allclose(model.predict_proba([paths[0], *floats[1:]]), from_paths, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict_proba(paths[2]), from_paths[2:], rtol=1e-5, atol=1e-6)  # batch of 1
    expected = np.where(from_paths[:, 1] >= model.threshold, model.classes_[1], model.classes_[0])
    assert list(model.predict(paths)) == list(expected)
    assert cv2.imread(paths[0], cv2.IMREAD_GRAYSCALE).shape == (40, 35)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([np.zeros((8, 8)), np.full((8, 8), 300.0)], r"images\[1\]: pixel values must be finite and in \[0, 255\]"),
        ([np.full((8, 8), np.nan)], r"images\[0\]: pixel values must be finite"),
        (np.zeros((2, 8, 8, 3)), r"images\[0\]: expected a grayscale H x W array .* shape \(2, 8, 8, 3\)"),
        ([np.zeros((8, 8), bool)], r"images\[0\]: expected uint8 or float pixels; got dtype bool"),
        ([], "images: no images to predict"),
        (["no/such.png"], "no/such.png: cannot read"),
    ],
)
def test_bad_images_are_named(model, images, message):
    with pytest.raises(InputError, match=message):
        model.predict_proba(images)


def test_feature_fusion_is_public_and_unknown_names_are_attribute_errors():
    from tlfusion.features.fusion import FeatureFusion

    assert tlfusion.FeatureFusion is FeatureFusion
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = tlfusion.nope
