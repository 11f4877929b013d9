"""The contracts between stages: run-folder paths, model names, the stage registry and the metrics.json schema."""

from __future__ import annotations

import json

import pytest

from tlfusion.errors import InputError
from tlfusion.evaluation.schema import read_metrics, validate_metrics, write_metrics
from tlfusion.models.names import FUSION, ModelName
from tlfusion.run import code_keys as stage_code
from tlfusion.run.paths import RunPaths
from tlfusion.stages.registry import REGISTRY, TASKS

ROW = {
    "model": "fusion/lr",
    "level": "image",
    "split": "test",
    "n": 4,
    **{metric: 0.5 for metric in ("accuracy", "f1", "kappa", "auroc", "sensitivity", "specificity")},
    "confusion": [[1, 1], [1, 1]],
    "threshold": 0.4,
    "ci": {"kappa": [0.1, 0.9], "auroc": None},
}
BINARY = {"experiment": "x", "task": "binary", "positive_class": "abnormal", "selected": "fusion/lr", "results": [ROW]}


def test_model_names_are_built_and_parsed_in_one_place():
    name = ModelName("densenet121", "lr")
    assert str(name) == "densenet121/lr" and ModelName.parse("densenet121/lr") == name
    assert ModelName.parse(f"{FUSION}/svm").is_fusion and not name.is_fusion
    assert str(ModelName.parse("bce")) == "bce"  # a multi-label loss: a feature set alone


def test_every_stage_names_run_paths_and_code_that_exist():
    paths = RunPaths("run")
    for task, stages in TASKS.items():
        assert set(stages) <= set(REGISTRY), task
    for stage in REGISTRY.values():
        for name in stage.reads + stage.writes:
            assert hasattr(paths, name), (stage.name, name)
        assert stage.module == f"tlfusion.stages.{stage.module.rsplit('.', 1)[-1]}", stage.name
        assert stage_code.module_file(stage.module) in stage_code.module_files(stage.module)
    assert paths.selection == paths.root / "fit" / "selection.json" and paths.model("a").name == "model.keras"


def test_metrics_schema_accepts_a_binary_document_and_refuses_a_wrong_one(tmp_path):
    write_metrics(tmp_path / "metrics.json", BINARY)
    assert read_metrics(tmp_path / "metrics.json") == BINARY
    with pytest.raises(ValueError, match="kappa"):
        write_metrics(tmp_path / "bad.json", {**BINARY, "results": [{**ROW, "kappa": "high"}]})
    assert not (tmp_path / "bad.json").exists()
    (tmp_path / "old.json").write_text(json.dumps({**BINARY, "timings": {"fit": 1.0}}))  # keys it does not know
    with pytest.raises(InputError, match="old.json: does not match the metrics.json schema"):
        read_metrics(tmp_path / "old.json")
    with pytest.raises(ValueError):
        validate_metrics({**BINARY, "task": "fewshot"})
