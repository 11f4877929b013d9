"""kill -9 inside each stage of `tlfusion run`, then the same command again: it exits 0 with the `metrics.json` of
an uninterrupted run, no leftovers (temporary files, staging folders, uncommitted cache chunks) and the run
folder's lock free.

The run is a real `tlfusion` process. A small driver (below, test code only) starts it and SIGKILLs it from inside at
a known point of real work: when the given stage is about to rename a finished temporary file onto the named output
(`os.replace` in `tlfusion.fileio.write_atomic` and the bundle writer). At that moment the stage has done part of
its work, its temporary file is complete on disk and nothing is recorded done: the worst time for a kill.
"""

from __future__ import annotations

import filecmp
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_folder_dataset
from tlfusion.bundle.folder import load_bundle
from tlfusion.fileio import locked
from tlfusion.stages.registry import TASKS

DRIVER = """
import fnmatch, os, signal, sys
from tlfusion.pipeline import Pipeline

stage_to_kill, pattern = sys.argv[1], sys.argv[2]
current = [None]
run_stage, replace = Pipeline._run_stage, os.replace

def traced_run_stage(self, stage):
    current[0] = stage
    try:
        run_stage(self, stage)
    finally:
        current[0] = None

def killing_replace(source, target, *args, **kwargs):
    if current[0] == stage_to_kill and fnmatch.fnmatch(os.path.basename(os.fspath(target)), pattern):
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(source, target, *args, **kwargs)

Pipeline._run_stage, os.replace = traced_run_stage, killing_replace
from tlfusion.cli import main
sys.exit(main(sys.argv[3:]))
"""

TINY_BACKBONE = {"name": "mobilenetv2", "options": {"alpha": 0.35}}
LEFTOVERS = re.compile(r"^\..*\.(tmp|partial|old)")
"""Names of `write_atomic` temp files and bundle staging / replaced folders."""


def experiment_file(folder: Path, **changes) -> Path:
    raw = {
        "name": "killed",
        "positive_class": "abnormal",
        "data": {"format": "folder", "root": str(write_folder_dataset(folder / "data"))},
        "split": {"test_fraction": 0.25, "val_fraction": 0.25},
        "image": {"size": 32},
        "backbones": [TINY_BACKBONE, TINY_BACKBONE],
        "finetune": {"warmup_epochs": 1, "epochs": 2, "batch_size": 8},
        "classifiers": {"models": ["lr"], "cv": 2},
        "evaluate": {"bootstrap": 20},
        "explain": {"cases": 1, "lime_samples": 10},
        **changes,
    }
    path = folder / "killed.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tlfusion(*argv: str | Path, kill: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    """`tlfusion ARGV` in a new process; with `kill` (stage, file name pattern), SIGKILLed as described above."""
    prefix = ["-c", DRIVER, *kill] if kill else ["-m", "tlfusion"]
    command = [sys.executable, *prefix, *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def leftovers(run: Path) -> list[Path]:
    """Temp files, staging folders and cache chunks whose hash list (the commit) was never written."""
    named = [path for path in run.rglob(".*") if LEFTOVERS.match(path.name)]
    uncommitted = [path for path in run.glob("cache/*/chunk-*.npy") if not path.with_suffix(".txt").exists()]
    return named + uncommitted


def file_names(run: Path) -> set[str]:
    """The run folder's files, hex names (cache keys: a saved model's sha256 differs save to save) made alike."""
    names = {path.relative_to(run).as_posix() for path in run.rglob("*") if path.is_file()}
    return {re.sub(r"[0-9a-f]{16,}", "<hex>", name) for name in names}


def assert_resumed(run: Path, command: str, experiment: Path) -> None:
    """`tlfusion COMMAND` on the killed run folder completes every stage and leaves nothing behind."""
    resumed = tlfusion(command, experiment, "--out", run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert leftovers(run) == []
    with locked(run):  # raises InputError if any process still held the folder
        pass
    stages = TASKS["binary"] if command == "run" else TASKS["binary"][: TASKS["binary"].index(command) + 1]
    assert set(recorded(run)) == set(stages)


def recorded(run: Path) -> dict[str, str]:
    """The run folder's stage record (stage -> key of its last completed run); none before `data` completes."""
    state = run / ".stages.json"
    return json.loads(state.read_text()) if state.exists() else {}


def test_killed_while_moving_the_bundle_into_place_resumes_without_leftovers(tmp_path):
    """The fast representative: `tlfusion fit` killed as the bundle's staging folder is renamed into place (the
    issue's 50 MB `.bundle.<id>.partial`), then run again."""
    changes = {"backbones": [TINY_BACKBONE], "finetune": {"enabled": False}, "features": {"engine": "keras"}}
    experiment = experiment_file(tmp_path, **changes)
    run = tmp_path / "run"
    killed = tlfusion("fit", experiment, "--out", run, kill=("fit", "bundle"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [path.name for path in run.glob(".bundle.*.partial")] != [] and not (run / "bundle").exists()
    assert "fit" not in recorded(run)
    assert_resumed(run, "fit", experiment)
    selection = json.loads((run / "fit" / "selection.json").read_text())
    assert load_bundle(run / "bundle").threshold == selection["thresholds"][selection["selected"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """(experiment file, run folder) of a `tlfusion run` that nothing interrupted."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    experiment = experiment_file(folder)
    completed = tlfusion("run", experiment, "--out", folder / "run")
    assert completed.returncode == 0, completed.stderr[-3000:]
    return experiment, folder / "run"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "output"),
    [
        ("data", "table.csv"),  # scan.json written, the table not yet
        ("finetune", "checkpoint.keras"),  # after the first epoch of the first backbone
        ("extract", "chunk-*.txt"),  # a cache chunk's features written, its hash list (the commit) not yet
        ("fit", "bundle"),  # selection and predictions written, the bundle staged but not moved into place
        ("evaluate", "metrics.json"),
        ("explain", "review.csv"),  # explanation images written, the review sheet not yet
        ("report", "report.html"),
    ],
)
def test_kill_9_inside_a_stage_then_the_same_command_gives_the_uninterrupted_results(
    uninterrupted, tmp_path, stage, output
):
    experiment, reference = uninterrupted
    run = tmp_path / "run"
    killed = tlfusion("run", experiment, "--out", run, kill=(stage, output))
    assert killed.returncode == -signal.SIGKILL, f"never reached {stage}/{output}: {killed.stderr[-3000:]}"
    assert stage not in recorded(run)
    assert_resumed(run, "run", experiment)
    assert filecmp.cmp(run / "metrics.json", reference / "metrics.json", shallow=False)
    assert file_names(run) == file_names(reference)
