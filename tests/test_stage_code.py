"""Stage caches are keyed by the code each stage runs: a changed source file re-runs its stage and those after it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tlfusion import stage_code
from tlfusion.config import load_experiment
from tlfusion.pipeline import Pipeline
from tlfusion.stages import REGISTRY, TASKS


def names(stage: str) -> set[str]:
    return {
        path.relative_to(stage_code.PACKAGE_DIR).as_posix() for path in stage_code.stage_files(REGISTRY[stage].modules)
    }


def test_stage_files_follow_module_level_imports_only():
    extract = names("extract")
    assert {"stages/prepare.py", "stages/context.py", "features.py", "backbones.py", "data/images.py"} <= extract
    assert "classifiers.py" not in extract and "training.py" not in extract  # the stages import those lazily
    assert "pipeline.py" not in extract and "stages/binary.py" not in extract  # the runner and other stages
    assert {"explain/gradcam.py", "explain/lime.py", "bundle.py"} <= names("explain")
    assert "explain/gradcam.py" not in names("fit")


def test_code_key_changes_with_a_source_file_and_the_version(monkeypatch):
    fit, extract = REGISTRY["fit"].modules, REGISTRY["extract"].modules
    before = stage_code.code_key(fit)
    real_hash = stage_code.source_hash
    monkeypatch.setattr(
        stage_code, "source_hash", lambda path: "edited" if path.name == "classifiers.py" else real_hash(path)
    )
    edited = stage_code.code_key(fit)
    assert edited != before and stage_code.code_key(extract) == stage_code.code_key(extract)
    monkeypatch.setattr(stage_code, "__version__", "9.9.9")
    assert stage_code.code_key(fit) not in (before, edited)


def ran_stages(run_dir: Path, since: int) -> list[str]:
    """Stages the run.log says were computed (not skipped) after byte offset `since`."""
    return re.findall(r"INFO stage (\w+) \.\.\.", (run_dir / "run.log").read_text()[since:])


def test_a_changed_stage_source_reruns_it_and_the_stages_after_it(tmp_path, folder_dataset, monkeypatch):
    raw = {
        "name": "tiny",
        "positive_class": "abnormal",
        "data": {"format": "folder", "root": str(folder_dataset)},
        "split": {"test_fraction": 0.25, "val_fraction": 0.25},
        "image": {"size": 32},
        "backbones": [{"name": "mobilenetv2", "options": {"alpha": 0.35}}],
        "finetune": {"enabled": False},
        "features": {"engine": "keras"},
        "classifiers": {"models": ["lr"], "cv": 3},
        "evaluate": {"bootstrap": 10},
        "explain": {"enabled": False},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    snapshot: dict[Path, str] = {}  # the sources as first read: edits made elsewhere meanwhile do not count
    real_hash = stage_code.source_hash
    monkeypatch.setattr(stage_code, "source_hash", lambda path: snapshot.setdefault(path, real_hash(path)))
    experiment, run_dir = load_experiment(tmp_path / "tiny.yaml"), tmp_path / "run"
    log_size = 0

    def run_and_list() -> list[str]:
        nonlocal log_size
        Pipeline(experiment, run_dir).run()
        ran, log_size = ran_stages(run_dir, log_size), len((run_dir / "run.log").read_text())
        return ran

    assert run_and_list() == list(TASKS["binary"])
    assert run_and_list() == ["data"]  # data is always re-read; its key (and so everything after it) is unchanged

    snapshot[stage_code.PACKAGE_DIR / "classifiers.py"] = "edited"
    assert run_and_list() == ["data", "fit", "evaluate", "explain", "report"]
    assert run_and_list() == ["data"]  # the new key is stored: the edited code's outputs are reused from now on
