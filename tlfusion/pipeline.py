"""Runs an experiment's stages in order; each is skipped when its config, data, code and upstream are unchanged.

Binary task:     data -> finetune -> extract -> fit (+ bundle) -> evaluate -> explain -> report
Few-shot task:   data -> extract -> fewshot
Multi-label:     data -> extract -> semantic -> report
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlfusion.config import Experiment
from tlfusion.console import activity, progress, setup_logging
from tlfusion.data.sources import CHESTXRAY14_FINDINGS
from tlfusion.data.table import class_names, scan_with_cache, split_table, with_binary_target
from tlfusion.errors import InputError
from tlfusion.evaluation import evaluate_predictions, fusion_vs_single, pick_cases, semantic_metrics
from tlfusion.fileio import locked, remove_leftovers, write_atomic, write_json
from tlfusion.runfiles import (
    METRICS,
    PREDICTIONS,
    prediction_rows,
    read_features,
    read_json_object,
    read_predictions,
    read_selection,
)
from tlfusion.signing import key_id
from tlfusion.stage_code import code_key

log = logging.getLogger("tlfusion")

STAGES = {
    "binary": ("data", "finetune", "extract", "fit", "evaluate", "explain", "report"),
    "fewshot": ("data", "extract", "fewshot"),
    "multilabel": ("data", "extract", "semantic", "report"),
}
STAGE_SECTIONS = {
    "data": ("task", "seed", "data", "positive_class", "split"),
    "finetune": ("image", "backbones", "finetune"),
    "extract": ("features",),
    "fit": ("classifiers",),
    "evaluate": ("evaluate",),
    "explain": ("explain",),
    "fewshot": ("fewshot",),
    "semantic": ("semantic",),
    "report": (),
}


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    """One experiment's run folder and the stages that fill it."""

    def __init__(self, experiment: Experiment, run_dir: str | Path, skip_bad: bool = False, force: bool = False):
        self.experiment = experiment
        self.run_dir = Path(run_dir)
        self.skip_bad = skip_bad
        self.force = force
        self.state_path = self.run_dir / ".stages.json"
        self.timings: dict[str, float] = {}
        self._table: pd.DataFrame | None = None

    # ----------------------------------------------------------------- running
    def run(self, until: str | None = None) -> None:
        """Run the stages up to `until` holding the run folder's lock; a killed run's leftovers are removed first."""
        with locked(self.run_dir):
            remove_leftovers(self.run_dir)
            self._run_stages(until)

    def _run_stages(self, until: str | None) -> None:
        setup_logging(self.run_dir)
        stages = STAGES[self.experiment.task]
        if until is not None and until not in stages:
            raise InputError(f"stage {until!r} does not exist for a {self.experiment.task} experiment")
        state = _read_state(self.state_path)
        upstream = ""
        for stage in stages:
            key = self._stage_key(stage, upstream)
            if stage == "data" or self.force or state.get(stage) != key or not self._outputs_readable(stage):
                if stage != "data":  # recorded done only after it completes: a kill re-runs it and those after it
                    state = {name: done for name, done in state.items() if name not in stages[stages.index(stage) :]}
                    write_json(self.state_path, state)
                started = time.perf_counter()
                log.info("stage %s ...", stage)
                getattr(self, f"stage_{stage}")()
                self.timings[stage] = round(time.perf_counter() - started, 2)
                log.info("stage %s done in %.1f s", stage, self.timings[stage])
                state[stage] = key = self._stage_key(stage, upstream)
                write_json(self.state_path, state)
            else:
                log.info("stage %s unchanged, skipped", stage)
            upstream = key
            if stage == until:
                break
        self._log_outputs()

    def _outputs_readable(self, stage: str) -> bool:
        """Whether the outputs of `stage` that later stages read back are readable (if not: logged, and re-run)."""
        checks = {
            "extract": lambda: self.load_features(self.backbone_keys),
            "fit": self.fit_outputs,
            "evaluate": lambda: read_json_object(self.run_dir / METRICS),
            "semantic": lambda: read_json_object(self.run_dir / METRICS),
        }
        try:
            checks.get(stage, lambda: None)()
        except InputError as error:
            log.warning("%s; re-running stage %s", error, stage)
            return False
        return True

    def _log_outputs(self) -> None:
        """The closing lines: where the run folder, report, review gallery and bundle are."""
        log.info("run folder: %s", self.run_dir.resolve())
        outputs = {"report": "report.html", "gallery": "explanations/index.html", "bundle": "bundle", "log": "run.log"}
        for name, relative in outputs.items():
            if (self.run_dir / relative).exists():
                log.info("%-8s %s", f"{name}:", self.run_dir / relative)

    def _stage_key(self, stage: str, upstream: str) -> str:
        config = self.experiment.model_dump()
        sections = {name: config[name] for name in STAGE_SECTIONS[stage]}
        fingerprint = self.data_fingerprint() if stage == "data" and self._table is not None else ""
        parts = (stage, upstream, sections, fingerprint, code_key(stage))
        signing = key_id() if stage == "fit" else ""  # a new key re-runs fit, which signs the bundle with it
        return _digest(*parts, signing) if signing else _digest(*parts)

    # ----------------------------------------------------------------- data
    @property
    def table(self) -> pd.DataFrame:
        if self._table is None:
            self._table = pd.read_csv(self.run_dir / "data" / "table.csv", dtype={"patient": str, "study": str})
        return self._table

    def data_fingerprint(self) -> str:
        columns = [c for c in ("sha256", "label", "labels", "split", "patient") if c in self.table.columns]
        return _digest(self.table[columns].astype(str).values.tolist())

    def stage_data(self) -> None:
        from tlfusion.data.sources import read_sources, summarise
        from tlfusion.data.splits import content_groups

        experiment = self.experiment
        table = read_sources(experiment.data)
        table = self._scan(table)
        if experiment.task == "binary":
            table = with_binary_target(table, experiment.positive_class)
        table = split_table(table, experiment.split, experiment.seed)
        # Identical files under two patients are one patient from here on: CV folds, bootstrap and episodes.
        table["patient"] = content_groups(table)
        if "labels" in table.columns:
            table["labels"] = table["labels"].map("|".join)
        write_atomic(self.run_dir / "data" / "table.csv", lambda temp: table.to_csv(temp, index=False))
        summary = summarise(table if "label" in table.columns else table.assign(labels=table["labels"].str.split("|")))
        write_json(self.run_dir / "data" / "summary.json", summary)
        self._table = table
        log.info("data: %d images, %d patients, splits %s", summary["images"], summary["patients"], summary["splits"])

    def _scan(self, table: pd.DataFrame) -> pd.DataFrame:
        hashes, bad = scan_with_cache(table["path"].tolist(), self.run_dir / "data" / "scan.json", self.skip_bad)
        table = table.assign(sha256=hashes)
        if bad:
            write_json(self.run_dir / "data" / "skipped.json", [{"path": p, "reason": r} for p, r in bad])
            log.warning("skipped %d unreadable image(s), listed in data/skipped.json", len(bad))
        return table[table["sha256"] != ""].reset_index(drop=True)

    # ----------------------------------------------------------------- finetune
    @property
    def backbone_keys(self) -> list[str]:
        return backbone_keys(self.experiment)

    def model_path(self, key: str) -> Path:
        return self.run_dir / "backbones" / key / "model.keras"

    def stage_finetune(self) -> None:

        experiment, table = self.experiment, self.table
        trainval = table[table["split"].isin(["train", "val"])]
        pairs = list(zip(self.backbone_keys, experiment.backbones, strict=True))
        for key, entry in progress(pairs, "fine-tuning", lambda pair: pair[0]):
            out_dir = self.model_path(key).parent
            if not experiment.finetune.enabled:
                model = _plain_backbone(entry, experiment.image.size)
                write_atomic(self.model_path(key), model.save)
                continue
            from tlfusion.training import finetune

            spec = experiment.finetune
            log.info("fine-tuning %s (%s) on %d images", key, entry.weights or "random init", len(trainval))
            result = finetune(
                trainval,
                entry.name,
                out_dir,
                weights=entry.weights,
                positive_class=experiment.positive_class,
                image_size=experiment.image.size,
                clahe=experiment.image.clahe,
                warmup_epochs=spec.warmup_epochs,
                epochs=spec.epochs,
                learning_rate=spec.learning_rate,
                unfrozen_learning_rate=spec.unfrozen_learning_rate,
                batch_size=spec.batch_size,
                patience=spec.patience,
                batchnorm=spec.batchnorm,
                seed=experiment.seed,
                options=entry.options,
                verbose=0,
            )
            _log_training(key, result)

    # ----------------------------------------------------------------- extract
    def feature_path(self, key: str) -> Path:
        return self.run_dir / "features" / f"{key}.npy"

    def stage_extract(self) -> None:
        from tlfusion.features import extract_features

        experiment = self.experiment
        for key, entry in zip(self.backbone_keys, experiment.backbones, strict=True):
            fine_tuned = self.model_path(key)
            model = fine_tuned if fine_tuned.is_file() else _plain_backbone(entry, experiment.image.size)
            features = extract_features(
                model,
                self.table["path"].tolist(),
                experiment.image.size,
                clahe=experiment.image.clahe,
                batch_size=experiment.features.batch_size,
                cache_dir=self.run_dir / "cache",
                engine=experiment.features.engine,
                stages=experiment.features.stages,
            )
            write_atomic(self.feature_path(key), lambda temp, f=features: np.save(temp.open("wb"), f))
            log.info("features %s: %s", key, features.shape)

    def load_features(self, keys: list[str]) -> tuple[np.ndarray, list[int]]:
        blocks = [read_features(self.feature_path(key), len(self.table)) for key in keys]
        return np.hstack(blocks), [block.shape[1] for block in blocks]

    # ----------------------------------------------------------------- fit
    def feature_sets(self) -> dict[str, list[str]]:
        keys = self.backbone_keys
        sets = {key: [key] for key in keys} if len(keys) == 1 or self.experiment.classifiers.single_backbones else {}
        if len(keys) > 1:
            sets["fusion"] = keys
        return sets

    def stage_fit(self) -> None:
        from tlfusion.classifiers import make_classifier, select_model

        experiment, table = self.experiment, self.table
        spec = experiment.classifiers
        is_fit = table["split"].isin(["train", "val"]).to_numpy()
        y = table["y"].to_numpy()
        groups = table["patient"].astype(str).to_numpy()
        rows, cv_scores, thresholds, fitted = [], {}, {}, {}
        for set_name, keys in progress(list(self.feature_sets().items()), "selecting models on", lambda item: item[0]):
            X, block_sizes = self.load_features(keys)
            fusion = make_fusion(experiment, block_sizes).fit(X[is_fit])
            Z = fusion.transform(X)
            selection = select_model(
                Z[is_fit],
                y[is_fit],
                groups[is_fit],
                spec.models,
                cv=spec.cv,
                random_state=experiment.seed,
                scoring=spec.scoring,
                label=set_name,
            )
            for clf_name in spec.models:
                model_name = f"{set_name}/{clf_name}"
                estimator = make_classifier(clf_name, experiment.seed, **selection.params[clf_name])
                estimator.fit(Z[is_fit], y[is_fit])
                cv_scores[model_name] = selection.scores[clf_name]
                thresholds[model_name] = selection.thresholds[clf_name]
                fitted[model_name] = (keys, fusion, estimator)
                rows.append(prediction_rows(table[is_fit], model_name, "cv", selection.oof_prob[clf_name]))
                rows.append(
                    prediction_rows(table[~is_fit], model_name, "test", estimator.predict_proba(Z[~is_fit])[:, 1])
                )
        selected = max(cv_scores, key=lambda name: (cv_scores[name], name.startswith("fusion/")))
        predictions = pd.concat(rows, ignore_index=True)
        write_atomic(self.run_dir / "fit" / "predictions.csv", lambda temp: predictions.to_csv(temp, index=False))
        write_json(
            self.run_dir / "fit" / "selection.json",
            {
                "selected": selected,
                "scoring": spec.scoring,
                "cv": spec.cv,
                "cv_scores": cv_scores,
                "thresholds": thresholds,
            },
        )
        log.info("selected %s (CV %s %.3f on the training split)", selected, spec.scoring, cv_scores[selected])
        self._save_bundle(selected, *fitted[selected], thresholds[selected])

    def _save_bundle(self, selected: str, keys: list[str], fusion, estimator, threshold: float) -> None:
        from tlfusion.backbones import load_model_file
        from tlfusion.bundle import Bundle, save_bundle

        experiment = self.experiment
        bundle = Bundle(
            models={key: load_model_file(self.model_path(key)) for key in keys},
            fusion=fusion,
            classifier=estimator,
            threshold=float(threshold),
            class_names=class_names(self.table["label"], experiment.positive_class),
            image_size=experiment.image.size,
            clahe=experiment.image.clahe,
            meta={
                "experiment": experiment.name,
                "model": selected,
                "data_fingerprint": self.data_fingerprint(),
                "config": experiment.model_dump(),
            },
            onnx_graphs=self._converted_onnx_graphs(keys),
        )
        save_bundle(bundle, self.run_dir / "bundle")

    def _converted_onnx_graphs(self, keys: list[str]) -> dict[str, bytes]:
        """The ONNX graphs the extract stage converted (and checked) for these backbones; none where it ran Keras."""
        from tlfusion.features import ModelSource, onnx_cache_path

        paths = {key: onnx_cache_path(self.run_dir / "cache", ModelSource(self.model_path(key)).key) for key in keys}
        return {key: path.read_bytes() for key, path in paths.items() if path.is_file()}

    def fit_outputs(self) -> tuple[dict, pd.DataFrame]:
        """The fit stage's selection record and predictions, checked (`tlfusion.runfiles`)."""
        selection = read_selection(self.run_dir)
        return selection, read_predictions(self.run_dir, set(selection["thresholds"]))

    # ----------------------------------------------------------------- evaluate
    def stage_evaluate(self) -> None:
        from tlfusion.data.sources import summarise

        selection, predictions = self.fit_outputs()
        spec = self.experiment.evaluate
        results = evaluate_predictions(
            predictions, selection["thresholds"], spec.study_aggregation, spec.bootstrap, self.experiment.seed
        )
        metrics = {
            "experiment": self.experiment.name,
            "task": "binary",
            "positive_class": self.experiment.positive_class,
            "selected": selection["selected"],
            "selection": {k: selection[k] for k in ("scoring", "cv", "cv_scores")},
            "results": results,
            "fusion_vs_single": fusion_vs_single(
                predictions, selection["thresholds"], spec.study_aggregation, spec.bootstrap, self.experiment.seed
            ),
            "data": summarise(self.table),
            "test_images_seen_in_pretraining": seen_in_training(
                self.experiment, self.backbone_keys, self.table[self.table["split"] == "test"]
            ),
            "timings": self.timings,
        }
        warn_if_test_seen(metrics["test_images_seen_in_pretraining"])
        write_json(self.run_dir / "metrics.json", metrics)
        for line in _summary(metrics):
            log.info(line)

    # ----------------------------------------------------------------- explain
    def stage_explain(self) -> None:
        spec = self.experiment.explain
        if not spec.enabled or spec.cases == 0:
            log.info("explanations disabled")
            return
        from tlfusion.bundle import load_bundle
        from tlfusion.explain import explain_cases

        selection, predictions = self.fit_outputs()
        test = predictions[(predictions["model"] == selection["selected"]) & (predictions["split"] == "test")]
        cases = pick_cases(test, selection["thresholds"][selection["selected"]], spec.cases)
        with activity(f"explaining {len(cases)} cases ({', '.join(spec.methods)})"):
            explain_cases(
                load_bundle(self.run_dir / "bundle"),
                cases["path"].tolist(),
                cases["y_true"].tolist(),
                self.run_dir / "explanations",
                methods=tuple(spec.methods),
                lime_samples=spec.lime_samples,
                seed=self.experiment.seed,
                clahe=self.experiment.image.clahe,
            )

    # ----------------------------------------------------------------- report
    def stage_report(self) -> None:
        from tlfusion.reports import write_reports

        metrics = read_json_object(self.run_dir / METRICS)
        timings = metrics.get("timings")
        metrics["timings"] = {**(timings if isinstance(timings, dict) else {}), **self.timings}
        write_json(self.run_dir / METRICS, metrics)
        predictions = self.fit_outputs()[1] if (self.run_dir / PREDICTIONS).exists() else None
        write_reports(self.run_dir, metrics, predictions)

    # ----------------------------------------------------------------- few-shot
    def stage_fewshot(self) -> None:
        from tlfusion.features import FeatureFusion
        from tlfusion.fewshot import plot_shots_curve, run_fewshot, shots_curve

        spec, table = self.experiment.fewshot, self.table
        check_unseen(self.experiment, self.backbone_keys, table)
        X, block_sizes = self.load_features(self.backbone_keys)
        if len(block_sizes) > 1:  # stateless per-block L2: nothing is fitted on the evaluated images
            X = FeatureFusion(block_sizes=block_sizes, standardize=False, l2=True).fit_transform(X)
        y, groups = table["label"].astype(str).to_numpy(), table["patient"].astype(str).to_numpy()
        keep = np.isin(y, spec.classes) if spec.classes else np.ones(len(y), bool)
        if (table["split"] == "test").any():  # a defined test split is the evaluated pool
            keep &= (table["split"] == "test").to_numpy()
        result = run_fewshot(
            X[keep],
            y[keep],
            groups[keep],
            spec.ways,
            spec.shots,
            spec.queries,
            spec.episodes,
            spec.classifier,
            seed=self.experiment.seed,
        )
        write_json(self.run_dir / "fewshot.json", result)
        curve = shots_curve(
            X[keep],
            y[keep],
            groups[keep],
            shots_list=spec.shots_curve,
            ways=spec.ways,
            queries=spec.queries,
            episodes=spec.episodes,
            classifiers=[spec.classifier],
            seed=self.experiment.seed,
        )
        write_json(self.run_dir / "fewshot_curve.json", curve)
        plot_shots_curve(curve, self.run_dir / "plots" / "fewshot_auroc_vs_shots.png")
        log.info(
            "few-shot %d-way %d-shot AUROC %.3f %s",
            spec.ways,
            spec.shots,
            result["auroc"]["mean"],
            result["auroc"]["ci95"],
        )

    # ----------------------------------------------------------------- multi-label
    def stage_semantic(self) -> None:
        table = self.table
        findings = self.experiment.data[0].findings or list(CHESTXRAY14_FINDINGS)
        X, _ = self.load_features(self.backbone_keys)
        Y = np.array(
            [[name in str(labels).split("|") for name in findings] for labels in table["labels"].fillna("")],
            dtype=np.float32,
        )
        metrics = semantic_metrics(self.experiment, X, Y, table, findings)
        metrics.update(
            {"data": {"images": len(table), "patients": int(table["patient"].nunique())}, "timings": self.timings}
        )
        write_json(self.run_dir / "metrics.json", metrics)
        for line in _summary(metrics):
            log.info(line)


def backbone_keys(experiment: Experiment) -> list[str]:
    """Unique, readable names for the experiment's backbones (`densenet121`, `densenet121_2`, ...)."""
    keys: list[str] = []
    for entry in experiment.backbones:
        key, number = entry.name.lower(), 2
        while key in keys:
            key, number = f"{entry.name.lower()}_{number}", number + 1
        keys.append(key)
    return keys


def _plain_backbone(entry, image_size: int):
    from tlfusion.backbones import build_backbone

    return build_backbone(entry.name, image_size, entry.weights, **entry.options)


def _read_state(path: Path) -> dict[str, str]:
    """The run folder's stage record (`.stages.json`): stage -> key of its last completed run."""
    try:
        state = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable stage record ({error}); delete it to re-run every stage") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a stage record; delete it to re-run every stage")
    return state


def make_fusion(experiment: Experiment, block_sizes: list[int]):
    from tlfusion.features import FeatureFusion

    spec = experiment.features
    return FeatureFusion(block_sizes=block_sizes, standardize=spec.standardize, l2=spec.l2, pca=spec.pca)


def _log_training(key: str, result) -> None:
    """Fine-tuning's outcome on the console, its epochs in run.log (Keras prints nothing: verbose=0)."""
    for epoch in result.history:
        log.debug("fine-tuning %s epoch %s", key, json.dumps(epoch, default=float))
    scores = ", ".join(f"{name.removeprefix('val_')} {value:.3f}" for name, value in result.val_metrics.items())
    log.info("fine-tuned %s: %d epochs, best epoch %d (val %s)", key, len(result.history), result.best_epoch, scores)


def _summary(metrics: dict) -> list[str]:
    from tlfusion.reports import summary_lines

    return summary_lines(metrics)


def seen_in_training(experiment: Experiment, keys: list[str], table: pd.DataFrame) -> dict[str, int]:
    """Backbone key -> how many of the table's images are in its weights' `seen_images.txt` (backbones without a
    local weights file are left out; a weights file without the list is warned about and left out)."""
    from tlfusion.provenance import SEEN_IMAGES, read_seen_images

    images = set(table["sha256"])
    seen = {}
    for key, entry in zip(keys, experiment.backbones, strict=True):
        if not entry.weights or entry.weights == "imagenet":
            continue
        seen_file = Path(entry.weights).parent / SEEN_IMAGES
        if not seen_file.is_file():
            log.warning("%s: no seen_images.txt beside %s: cannot check what it was trained on", key, entry.weights)
            continue
        seen[key] = len(images & read_seen_images(seen_file))
    return seen


def check_unseen(experiment: Experiment, keys: list[str], table: pd.DataFrame) -> None:
    """Refuse a few-shot evaluation on images a backbone was trained on (its `seen_images.txt`)."""
    for key, count in seen_in_training(experiment, keys, table).items():
        if count:
            raise InputError(
                f"backbones.{key}: {count} evaluated image(s) were in its training data (seen_images.txt beside "
                f"its weights); use an extractor pretrained with this data set held out"
            )


def warn_if_test_seen(seen: dict[str, int]) -> None:
    """A loud warning per backbone that was trained on test images: its scores there are optimistic."""
    for key, count in seen.items():
        if count:
            log.warning(
                "backbones.%s was pretrained on %d test image(s) (identical files, by sha256): test scores are "
                "optimistic; hold the test images out of pretraining or change the split",
                key,
                count,
            )
