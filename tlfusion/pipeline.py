"""The stage runner: runs an experiment's stages (`tlfusion.stages.registry.REGISTRY`) in order, each skipped when its
config, data, code and upstream are unchanged and its outputs read back."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tlfusion.bundle.signing import key_id
from tlfusion.config.experiment import Experiment
from tlfusion.console import setup_logging
from tlfusion.errors import InputError
from tlfusion.features.cache import remove_uncommitted
from tlfusion.fileio import locked, remove_leftovers, write_json
from tlfusion.run.code_keys import code_key
from tlfusion.run.paths import RunPaths
from tlfusion.stages.context import RunContext, digest
from tlfusion.stages.registry import REGISTRY, TASKS

log = logging.getLogger("tlfusion")


class Pipeline(RunContext):
    """One experiment's run folder and the stages that fill it."""

    def __init__(self, experiment: Experiment, run_dir: str | Path, skip_bad: bool = False, force: bool = False):
        super().__init__(experiment, RunPaths(run_dir), skip_bad)
        self.force = force

    @property
    def run_dir(self) -> Path:
        return self.paths.root

    def run(self, until: str | None = None) -> None:
        """Run the stages up to `until` holding the run folder's lock; a killed run's leftovers (temporary files,
        staging folders, uncommitted feature-cache chunks) are removed first."""
        with locked(self.run_dir):
            remove_leftovers(self.run_dir)
            remove_uncommitted(self.paths.cache)
            self._run_stages(until)

    def _run_stages(self, until: str | None) -> None:
        setup_logging(self.run_dir)
        stages = TASKS[self.experiment.task]
        if until is not None and until not in stages:
            raise InputError(f"stage {until!r} does not exist for a {self.experiment.task} experiment")
        state = _read_state(self.paths.state)
        upstream = ""
        for stage in stages:
            key = self.stage_key(stage, upstream)
            if stage == "data" or self.force or state.get(stage) != key or not self._outputs_readable(stage):
                if stage != "data":  # recorded done only after it completes: a kill re-runs it and those after it
                    state = {name: done for name, done in state.items() if name not in stages[stages.index(stage) :]}
                    write_json(self.paths.state, state)
                self._run_stage(stage)
                state[stage] = key = self.stage_key(stage, upstream)
                write_json(self.paths.state, state)
            else:
                log.info("stage %s unchanged, skipped", stage)
            upstream = key
            if stage == until:
                break
        self._log_outputs()

    def _run_stage(self, stage: str) -> None:
        """Run one stage, its time logged and recorded in timings.json."""
        started = time.perf_counter()
        log.info("stage %s ...", stage)
        REGISTRY[stage].run(self)
        self.timings[stage] = round(time.perf_counter() - started, 2)
        log.info("stage %s done in %.1f s", stage, self.timings[stage])
        recorded = _read_timings(self.paths.timings)
        write_json(self.paths.timings, recorded | {stage: self.timings[stage]})

    def _outputs_readable(self, stage: str) -> bool:
        """Whether the outputs of `stage` that later stages read back are readable (if not: logged, and re-run)."""
        check = REGISTRY[stage].check
        try:
            if check is not None:
                check(self)
        except InputError as error:
            log.warning("%s; re-running stage %s", error, stage)
            return False
        return True

    def _log_outputs(self) -> None:
        """The closing lines: where the run folder, report, review gallery and bundle are."""
        log.info("run folder: %s", self.run_dir.resolve())
        paths = self.paths
        outputs = {"report": paths.report, "gallery": paths.gallery, "bundle": paths.bundle, "log": paths.log}
        for name, path in outputs.items():
            if path.exists():
                log.info("%-8s %s", f"{name}:", path)

    def stage_key(self, stage: str, upstream: str) -> str:
        """The cache key of `stage`: its config sections, upstream key, data (for `data`), code and signing key."""
        config = self.experiment.model_dump()
        spec = REGISTRY[stage]
        sections = {name: _section(config, name) for name in spec.sections}
        fingerprint = self.data_fingerprint() if stage == "data" and self.has_table else ""
        parts = (stage, upstream, sections, fingerprint, code_key(spec.module))
        signing = key_id() if stage == "fit" else ""  # a new key re-runs fit, which signs the bundle with it
        return digest(*parts, signing) if signing else digest(*parts)


def _section(config: dict, name: str):
    """The config value a stage's section name stands for: a section (`evaluate`) or a key in one
    (`evaluate.calibration`)."""
    for key in name.split("."):
        config = config[key]
    return config


def _read_state(path: Path) -> dict[str, str]:
    """The run folder's stage record (`.stages.json`): stage -> key of its last completed run."""
    try:
        state = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable stage record ({error}); delete it to re-run every stage") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a stage record; delete it to re-run every stage")
    return state


def _read_timings(path: Path) -> dict[str, float]:
    """timings.json (stage -> seconds); a missing or unreadable one counts as empty (it is only reported)."""
    try:
        timings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return timings if isinstance(timings, dict) else {}
