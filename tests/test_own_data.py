"""The README's own-data example, run as written (plus settings that make it fast) on fixture data."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest

from tlfusion.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = {
    "image.size": "32",
    "backbones": "[{name: mobilenetv2, options: {alpha: 0.35}}]",
    "finetune.enabled": "false",
    "features.engine": "keras",
    "classifiers.models": "[lr]",
    "classifiers.cv": "2",
    "evaluate.bootstrap": "20",
    "explain.enabled": "false",
}
NOISE = ("tensorflow", "Instructions for updating", "WARNING", "Epoch", "oneDNN", "absl", "tf2onnx", "retracing")


def settings(values: dict[str, str]) -> list[str]:
    return [part for key, value in values.items() for part in ("--set", f"{key}={value}")]


def readme_own_data_commands() -> list[list[str]]:
    """The `tlfusion ...` lines of the README's "Your own data" code block, as argument lists."""
    section = (REPO / "README.md").read_text().split("## Your own data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.startswith("tlfusion ")]


@pytest.fixture
def own_data(tmp_path, folder_dataset, monkeypatch) -> Path:
    """`my_xrays/<class>/*.png` and `my_data/labels.csv` (path, label, patient) in the working folder, with the
    repository's experiments/ beside them."""
    folder_dataset.rename(tmp_path / "my_xrays")
    rows = [
        (f"images/{image.parent.name}_{image.name}", image.parent.name, f"p{i // 2 if i < 8 else i}")
        for i, image in enumerate(sorted((tmp_path / "my_xrays").rglob("*.png")))
    ]
    for path, label, _ in rows:
        target = tmp_path / "my_data" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((tmp_path / "my_xrays" / label / path.split("_", 1)[1]).read_bytes())
    pd.DataFrame(rows, columns=["path", "label", "patient"]).to_csv(tmp_path / "my_data" / "labels.csv", index=False)
    (tmp_path / "experiments").symlink_to(REPO / "experiments")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_own_data_example_runs_as_written_and_quietly(own_data, capfd):
    commands = readme_own_data_commands()
    assert [argv[:2] for argv in commands] == [
        ["data", "experiments/own_folder.yaml"],
        ["run", "experiments/own_folder.yaml"],
        ["run", "experiments/own_csv.yaml"],
    ]
    for argv in commands:
        capfd.readouterr()
        assert main(argv + (settings(FAST) if argv[0] == "run" else [])) == 0, argv
        if argv[0] == "data":
            summary = json.loads(capfd.readouterr().out)
            assert summary["images"] == 24
    console = "\n".join(capfd.readouterr())  # the CSV run's
    assert not [word for word in NOISE if word in console], console
    assert "select_model: mobilenetv2: CV kappa lr " in console
    assert "report:  runs/my_data/report.html" in console and "bundle:  runs/my_data/bundle" in console
    for run in ("runs/my_xrays", "runs/my_data"):
        metrics = json.loads((own_data / run / "metrics.json").read_text())
        assert metrics["selected"] == "mobilenetv2/lr" and metrics["data"]["images"] == 24
        assert (own_data / run / "bundle" / "manifest.json").is_file()
    assert json.loads((own_data / "runs/my_data/metrics.json").read_text())["data"]["patients"] == 20
