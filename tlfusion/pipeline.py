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
from tlfusion.errors import InputError
from tlfusion.fileio import locked, remove_leftovers, write_atomic, write_json
from tlfusion.runfiles import METRICS, PREDICTIONS, read_features, read_json_object, read_predictions, read_selection
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
        table = _assign(table, experiment)
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
                flip=experiment.features.flip,
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
                rows.append(_prediction_rows(table[is_fit], model_name, "cv", selection.oof_prob[clf_name]))
                rows.append(
                    _prediction_rows(table[~is_fit], model_name, "test", estimator.predict_proba(Z[~is_fit])[:, 1])
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
            flip=experiment.features.flip,
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
        results = evaluate_predictions(predictions, selection["thresholds"], self.experiment)
        metrics = {
            "experiment": self.experiment.name,
            "task": "binary",
            "positive_class": self.experiment.positive_class,
            "selected": selection["selected"],
            "selection": {k: selection[k] for k in ("scoring", "cv", "cv_scores")},
            "results": results,
            "fusion_vs_single": fusion_vs_single(
                predictions,
                selection["thresholds"],
                self.experiment.evaluate.study_aggregation,
                self.experiment.evaluate.bootstrap,
                self.experiment.seed,
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


def semantic_metrics(
    experiment: Experiment, X: np.ndarray, Y: np.ndarray, table: pd.DataFrame, findings: list[str]
) -> dict:
    """Per-finding test AUROC (+ patient-bootstrap CI of the mean) for each loss, and GZSL on the unseen split."""
    from tlfusion.label_embeddings import load_label_vectors
    from tlfusion.semantic import SemanticMetricClassifier, evaluate_gzsl, per_finding_auroc

    spec = experiment.semantic
    vectors = dict(zip(findings, load_label_vectors(spec.label_vectors, findings), strict=True))
    unknown = sorted(set(spec.unseen) - set(findings))
    if unknown:
        raise InputError(f"semantic.unseen: unknown finding(s) {unknown}")
    seen = [name for name in findings if name not in spec.unseen]
    fit_rows, val_rows, test_rows = (table["split"].to_numpy() == part for part in ("train", "val", "test"))
    patients = table["patient"].astype(str).to_numpy()
    results, gzsl, val_scores = [], {}, {}
    for loss in spec.losses:
        model = SemanticMetricClassifier(loss=loss, dim=spec.dim, epochs=spec.epochs, random_state=experiment.seed)
        model.fit(X[fit_rows], Y[fit_rows], vectors, seen=findings)
        val_scores[loss] = _mean_auroc(Y[val_rows], model.decision_function(X[val_rows], vectors), findings)
        scores = model.decision_function(X[test_rows], vectors)
        auroc = per_finding_auroc(Y[test_rows], scores, findings)
        ci = _bootstrap_mean_auroc(
            Y[test_rows], scores, patients[test_rows], findings, experiment.evaluate.bootstrap, experiment.seed
        )
        results += [{"model": loss, "finding": name, "split": "test", "auroc": value} for name, value in auroc.items()]
        results.append(
            {
                "model": loss,
                "finding": "mean",
                "split": "test",
                "n": int(test_rows.sum()),
                "auroc": _mean_auroc(Y[test_rows], scores, findings),
                "ci": {"auroc": ci},
            }
        )
        if spec.unseen:
            zero_shot = SemanticMetricClassifier(
                loss=loss, dim=spec.dim, epochs=spec.epochs, random_state=experiment.seed
            )
            seen_columns = [findings.index(name) for name in seen]
            zero_shot.fit(X[fit_rows], Y[fit_rows][:, seen_columns], vectors, seen=seen)
            gzsl[loss] = evaluate_gzsl(
                Y[test_rows], zero_shot.decision_function(X[test_rows], vectors), findings, seen, spec.unseen
            )
    best = max(val_scores, key=lambda loss: val_scores[loss] or 0)
    return {
        "experiment": experiment.name,
        "task": "multilabel",
        "selected": best,
        "val_mean_auroc": val_scores,
        "findings": findings,
        "seen": seen,
        "unseen": list(spec.unseen),
        "results": results,
        "gzsl": gzsl,
    }


# --------------------------------------------------------------------------- helpers used by the stages


def _mean_auroc(Y: np.ndarray, scores: np.ndarray, findings: list[str]) -> float | None:
    from tlfusion.metrics import multilabel_auroc

    return multilabel_auroc(Y, scores, findings)["mean"]


def _bootstrap_mean_auroc(Y, scores, patients, findings, n_boot: int, seed: int) -> list[float]:
    """Percentile 95% CI of the mean per-finding AUROC, resampling patients."""
    rng = np.random.default_rng(seed)
    unique = np.unique(patients)
    rows_of = {patient: np.flatnonzero(patients == patient) for patient in unique}
    values = []
    for _ in range(n_boot):
        rows = np.concatenate([rows_of[p] for p in rng.choice(unique, len(unique))])
        value = _mean_auroc(Y[rows], scores[rows], findings)
        if value is not None:
            values.append(value)
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else []


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


def scan_with_cache(paths: list[str], cache_path: Path, skip_bad: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """`images.scan_images` with a cache keyed by (path, size, mtime), so an unchanged data set re-scans in seconds."""
    from tlfusion.data.images import scan_images

    cache = _read_scan_cache(cache_path)

    def stamp(path: str) -> str:
        info = Path(path).stat()
        return f"{path}|{info.st_size}|{info.st_mtime_ns}"

    stamps = [stamp(p) if Path(p).is_file() else "" for p in paths]
    todo = [p for p, s in zip(paths, stamps, strict=True) if not s or s not in cache]
    hashes, bad = scan_images(todo, skip_bad=skip_bad)
    fresh = dict(zip(todo, hashes, strict=True))
    cache.update({s: fresh[p] for p, s in zip(paths, stamps, strict=True) if s and fresh.get(p)})
    write_json(cache_path, cache)
    return [fresh[p] if p in fresh else cache[s] for p, s in zip(paths, stamps, strict=True)], bad


def _read_scan_cache(path: Path) -> dict[str, str]:
    """data/scan.json (file stamp -> sha256); an unreadable one is a stale cache: warned about, then rebuilt."""
    if not (path.exists() or path.is_symlink()):
        return {}
    try:
        cache = read_json_object(path)
    except InputError as error:
        log.warning("%s; scanning every image again", error)
        return {}
    return {stamp: digest for stamp, digest in cache.items() if isinstance(digest, str)}


def _read_state(path: Path) -> dict[str, str]:
    """The run folder's stage record (`.stages.json`): stage -> key of its last completed run."""
    try:
        state = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable stage record ({error}); delete it to re-run every stage") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a stage record; delete it to re-run every stage")
    return state


def with_binary_target(table: pd.DataFrame, positive: str) -> pd.DataFrame:
    """Add `y` (1 for the positive class); the data must have exactly two classes."""
    classes = sorted(table["label"].astype(str).unique())
    if positive not in classes:
        raise InputError(f"positive_class: {positive!r} is not a label of the data (labels: {classes})")
    if len(classes) != 2:
        raise InputError(f"data: a binary experiment needs exactly two labels, found {classes} (use data.label_map)")
    return table.assign(label=table["label"].astype(str), y=(table["label"].astype(str) == positive).astype(int))


def class_names(labels: pd.Series, positive: str) -> list[str]:
    """[negative, positive] as a bundle stores them."""
    return [*sorted(set(labels.astype(str)) - {positive}), positive]


def _assign(table: pd.DataFrame, experiment: Experiment) -> pd.DataFrame:
    from tlfusion.data.splits import assign_splits

    spec = experiment.split
    multilabel = "label" not in table.columns
    if multilabel:  # stratify on "any finding"
        table = table.assign(label=table["labels"].map(lambda labels: "abnormal" if labels else "normal"))
    split = assign_splits(
        table, spec.test_fraction, spec.val_fraction, spec.group, experiment.seed, tuple(spec.test_split)
    )
    return split.drop(columns="label") if multilabel else split


def make_fusion(experiment: Experiment, block_sizes: list[int]):
    from tlfusion.features import FeatureFusion

    spec = experiment.features
    return FeatureFusion(block_sizes=block_sizes, standardize=spec.standardize, l2=spec.l2, pca=spec.pca)


def _prediction_rows(rows: pd.DataFrame, model: str, split: str, prob: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": model,
            "split": split,
            "path": rows["path"].to_numpy(),
            "patient": rows["patient"].astype(str).to_numpy(),
            "study": rows["study"].astype(str).to_numpy(),
            "y_true": rows["y"].to_numpy(),
            "prob": prob,
        }
    )


def evaluate_predictions(predictions: pd.DataFrame, thresholds: dict[str, float], experiment: Experiment) -> list:
    """metrics.json result rows: every model, CV (out-of-fold) and test split, image and (optionally) study level."""
    from tlfusion.metrics import binary_metrics, bootstrap_ci

    spec = experiment.evaluate
    results = []
    for (model, split), rows in predictions.groupby(["model", "split"], sort=False):
        threshold = thresholds[model]
        for level, y, p, groups in evaluation_levels(rows, spec.study_aggregation):
            row = {
                "model": model,
                "level": level,
                "split": split,
                **binary_metrics(y, p, threshold),
                "threshold": threshold,
            }
            row["ci"] = (
                bootstrap_ci(y, p, groups, threshold, n_boot=spec.bootstrap, seed=experiment.seed)
                if spec.bootstrap and split == "test"
                else {}
            )
            results.append(row)
    return results


def evaluation_levels(rows: pd.DataFrame, study_aggregation: str | None) -> list[tuple[str, np.ndarray, ...]]:
    """(level, labels, probabilities, patient of each item) at image level and, when aggregating, study level."""
    from tlfusion.metrics import aggregate_by_study

    levels = [("image", rows["y_true"].to_numpy(), rows["prob"].to_numpy(), rows["patient"].to_numpy())]
    if study_aggregation:
        studies, y, p = aggregate_by_study(
            rows["study"].to_numpy(), rows["y_true"].to_numpy(), rows["prob"].to_numpy(), how=study_aggregation
        )
        patient_of = dict(zip(rows["study"], rows["patient"], strict=True))
        levels.append(("study", y, p, np.array([patient_of[s] for s in studies])))
    return levels


def fusion_vs_single(
    predictions: pd.DataFrame,
    thresholds: dict[str, float],
    study_aggregation: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """Fusion minus each single backbone with the same classifier on the test split, per level: kappa and AUROC
    differences with paired patient-bootstrap CIs (both models scored on the same resamples)."""
    from tlfusion.metrics import paired_bootstrap_delta

    if not n_boot:
        return []
    test = predictions[predictions["split"] == "test"].sort_values("path", kind="stable")
    levels = {model: evaluation_levels(rows, study_aggregation) for model, rows in test.groupby("model", sort=False)}
    comparisons = []
    for fused in levels:
        feature_set, _, classifier = fused.partition("/")
        if feature_set != "fusion":
            continue
        for single in levels:
            if single == fused or single.partition("/")[2] != classifier:
                continue
            for (level, y, p_fused, groups), (_, _, p_single, _) in zip(levels[fused], levels[single], strict=True):
                delta = paired_bootstrap_delta(
                    y, p_fused, p_single, groups, thresholds[fused], thresholds[single], n_boot, seed
                )
                row = {"level": level, "classifier": classifier, "fusion": fused, "single": single}
                comparisons.append(row | {metric: delta[metric] for metric in ("kappa", "auroc")})
    return comparisons


def pick_cases(test: pd.DataFrame, threshold: float, count: int) -> pd.DataFrame:
    """Cases worth a reviewer's time: errors first (most confident first), then the most confident correct ones."""
    test = test.assign(
        wrong=(test["prob"] >= threshold).astype(int) != test["y_true"], confidence=(test["prob"] - threshold).abs()
    )
    return test.sort_values(["wrong", "confidence"], ascending=False).head(count)


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
    from tlfusion.training import SEEN_IMAGES, read_seen_images

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


# --------------------------------------------------------------------------- bundle commands


def _experiment_rows(data: str, data_root: str | None, split: str) -> tuple[Experiment, pd.DataFrame]:
    from tlfusion.config import load_experiment
    from tlfusion.data.sources import read_sources

    experiment = load_experiment(data, data_root=data_root)
    table = read_sources(experiment.data)
    if split != "all":
        table = _assign(table, experiment)
        table = table[table["split"] == split]
    if table.empty:
        raise InputError(f"{data}: no images in split {split!r}")
    return experiment, table


def load_reported(bundle_dir: str):
    """`bundle.load_bundle`, its trust level ("signed ..." or "integrity only ...") printed on stderr."""
    import sys

    from tlfusion.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    print(f"tlfusion: bundle {bundle_dir}: {bundle.trust}", file=sys.stderr)
    return bundle


def predict_images(bundle_dir: str, inputs: list[str], out: str | None, skip_bad: bool = False) -> None:
    """Write a CSV of path, probability, predicted class for image files / folders."""
    import sys

    from tlfusion.data.images import scan_images
    from tlfusion.data.sources import image_files

    paths: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():  # entries that are not regular files are listed for scan_images to refuse by name
            paths += [str(p) for p in image_files(item, follow_symlinks=True)]
        elif item.exists() or item.is_symlink():
            paths.append(str(item))
        else:
            raise InputError(f"{item}: no such file or folder")
    hashes, bad = scan_images(paths, skip_bad=skip_bad)
    for path, reason in bad:
        print(f"tlfusion: skipped {path}: {reason}", file=sys.stderr)
    paths = [p for p, h in zip(paths, hashes, strict=True) if h]
    bundle = load_reported(bundle_dir)
    prob = bundle.predict_paths(paths)
    frame = pd.DataFrame(
        {
            "path": paths,
            f"prob_{bundle.class_names[1]}": prob,
            "predicted": np.where(prob >= bundle.threshold, bundle.class_names[1], bundle.class_names[0]),
        }
    )
    if out:
        write_atomic(out, lambda temp: frame.to_csv(temp, index=False))
    else:
        frame.to_csv(sys.stdout, index=False)


def evaluate_bundle(bundle_dir: str, data: str, out: str, data_root: str | None = None, split: str = "test") -> None:
    """Metrics (with CIs) and a report for a saved bundle on an experiment's images."""
    from tlfusion.bundle import check_class_names
    from tlfusion.reports import write_reports

    experiment, table = _experiment_rows(data, data_root, split)
    bundle = load_reported(bundle_dir)
    check_class_names(bundle, class_names(table["label"], bundle.class_names[1]))
    table = with_binary_target(table, bundle.class_names[1])
    prob = bundle.predict_paths(table["path"].tolist())
    name = bundle.meta.get("model", "bundle")
    predictions = _prediction_rows(table, name, split, prob)
    metrics = {
        "experiment": experiment.name,
        "task": "binary",
        "positive_class": bundle.class_names[1],
        "selected": name,
        "results": evaluate_predictions(predictions, {name: bundle.threshold}, experiment),
    }
    write_json(Path(out) / "metrics.json", metrics)
    write_reports(Path(out), metrics, predictions)
    for line in _summary(metrics):
        print(line)


def explain_bundle(
    bundle_dir: str,
    data: str,
    out: str,
    methods: list[str],
    cases: int,
    ids: list[str] | None,
    data_root: str | None,
    split: str,
    lime_samples: int,
) -> None:
    """Explanation images + review page for a bundle's predictions on an experiment's images."""
    from tlfusion.explain import explain_cases

    unknown = sorted(set(methods) - {"gradcam", "lime"})
    if unknown or not methods:
        raise InputError(f"--method: unknown method(s) {unknown or methods}; use gradcam, lime or both")
    experiment, table = _experiment_rows(data, data_root, split)
    bundle = load_reported(bundle_dir)
    table = with_binary_target(table, bundle.class_names[1])
    if ids:
        wanted = table["path"].map(lambda p: p in ids or Path(p).name in ids)
        missing = set(ids) - set(table["path"]) - set(table["path"].map(lambda p: Path(p).name))
        if missing:
            raise InputError(f"--ids: not in the {split} split: {sorted(missing)[:3]}")
        chosen = table[wanted]
    else:
        prob = bundle.predict_paths(table["path"].tolist())
        chosen = pick_cases(table.assign(prob=prob, y_true=table["y"]), bundle.threshold, cases)
    explain_cases(
        bundle,
        chosen["path"].tolist(),
        chosen["y"].tolist(),
        Path(out),
        methods=tuple(methods),
        lime_samples=lime_samples,
        seed=experiment.seed,
        clahe=bundle.clahe,
    )


def fewshot_command(args: Any) -> None:
    """`tlfusion fewshot`: episodes on a cached feature table or on an experiment's images."""
    from tlfusion.fewshot import run_fewshot

    if args.features:
        X, y, groups = load_feature_table(args.features)
    else:
        X, y, groups = _experiment_features(args)
    result = run_fewshot(
        X, y, groups, args.ways, args.shots, args.queries, args.episodes, args.classifier, seed=args.seed
    )
    write_json(Path(args.out) / "fewshot.json", result)
    print(json.dumps({k: result[k] for k in ("ways", "shots", "episodes", "classifier", "auroc", "accuracy")}))


def load_feature_table(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cached feature table: `.npz` with arrays X, y, groups (no pickled objects)."""
    if not Path(path).is_file():
        raise InputError(f"{path}: feature table not found")
    try:
        with np.load(path, allow_pickle=False) as table:
            return table["X"], table["y"].astype(str), table["groups"].astype(str)
    except (KeyError, ValueError, OSError) as error:
        raise InputError(f"{path}: not a feature table with X, y, groups ({error})") from None


def _experiment_features(args: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from tlfusion.config import load_experiment

    overrides = ["task=fewshot"]
    if args.backbone:
        overrides.append(f"backbones=[{{name: {args.backbone}}}]")
    if args.stages is not None:
        overrides.append(f"features.stages={args.stages}")
    experiment = load_experiment(args.data, overrides, args.data_root)
    pipeline = Pipeline(experiment, Path(args.out))
    pipeline.run(until="extract")
    X, _ = pipeline.load_features(pipeline.backbone_keys)
    table = pipeline.table
    return X, table["label"].astype(str).to_numpy(), table["patient"].astype(str).to_numpy()
