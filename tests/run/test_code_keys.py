"""Stage caches are keyed by the code each stage runs: a changed source file re-runs its stage and those after it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tlfusion.config.experiment import load_experiment
from tlfusion.pipeline import Pipeline
from tlfusion.run import code_keys as stage_code
from tlfusion.stages.registry import REGISTRY, TASKS


def names(stage: str) -> set[str]:
    return {
        path.relative_to(stage_code.PACKAGE_DIR).as_posix() for path in stage_code.module_files(REGISTRY[stage].module)
    }


def test_stage_files_follow_every_import_of_the_stage_file():
    extract = names("extract")
    assert {"stages/extract.py", "stages/context.py", "features/extraction.py", "data/images.py"} <= extract
    assert "features/cluster.py" in extract  # imported inside a function: followed too
    assert {"features/__init__.py", "backbones/registry.py"} <= extract  # packages an import runs, and theirs
    assert "models/classifiers.py" not in extract and "training/finetune.py" not in extract  # not imported
    assert "pipeline.py" not in extract and "stages/fit.py" not in extract  # the runner and other stages
    assert {"explain/gradcam.py", "explain/lime.py", "bundle/folder.py"} <= names("explain")
    assert "explain/gradcam.py" not in names("fit")
    assert {"training/finetune.py", "training/multilabel.py"} <= names("finetune")


def test_imports_counts_function_level_and_type_only_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from tlfusion.bundle.folder import Bundle\n"
        "def f():\n    from tlfusion.evaluation import metrics\n    import tlfusion.fileio\n"
    )
    assert stage_code.imports(source) == {
        "tlfusion.bundle",
        "tlfusion.bundle.folder",
        "tlfusion.evaluation",
        "tlfusion.evaluation.metrics",
        "tlfusion.fileio",
    }


def test_code_key_changes_with_a_source_file_and_the_version(monkeypatch):
    fit, extract = REGISTRY["fit"].module, REGISTRY["extract"].module
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

    snapshot[stage_code.PACKAGE_DIR / "models" / "classifiers.py"] = "edited"
    assert run_and_list() == ["data", "fit", "evaluate", "explain", "report"]
    assert run_and_list() == ["data"]  # the new key is stored: the edited code's outputs are reused from now on
