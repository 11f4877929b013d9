"""The `tlfusion` command: parses, calls the modules, maps errors to exit codes (0 ok, 2 bad input, 1 internal)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tlfusion import __version__
from tlfusion.console import configure_process, import_tensorflow_quietly, log_internal_error, setup_logging
from tlfusion.errors import InputError
from tlfusion.run.paths import RunPaths

DEMO_EXPERIMENT = Path(__file__).resolve().parent / "demo" / "demo.yaml"
"""`tlfusion demo`'s experiment and its data (`demo/sample/`): package data, there in a checkout and in a wheel."""


def _set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set finetune.epochs=3 (repeatable)",
    )


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="experiment YAML file")
    parser.add_argument("--data-root", help="folder that relative data paths resolve against")
    parser.add_argument("--out", help="run folder (default: runs/<experiment name>)")
    _set_argument(parser)
    parser.add_argument("--skip-bad", action="store_true", help="report and skip unreadable images")
    parser.add_argument("--force", action="store_true", help="re-run every stage even when unchanged")
    parser.add_argument("--scheduler", help="extract features on this Dask scheduler's workers (features.scheduler)")


def _load(args: argparse.Namespace):
    """The validated experiment (no TensorFlow needed), then TensorFlow imported quietly unless for `data`."""
    from tlfusion.config.experiment import load_experiment

    scheduler = [f"features.scheduler={args.scheduler}"] if getattr(args, "scheduler", None) else []
    experiment = load_experiment(args.experiment, [*args.overrides, *scheduler], args.data_root)
    if args.command != "data":
        import_tensorflow_quietly()
    return experiment


def _run_folder(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out) if args.out else Path("runs") / name


def cmd_run(args: argparse.Namespace, until: str | None = None) -> int:
    track = getattr(args, "track", None)
    if track:
        from tlfusion.reports.tracking import require_mlflow

        require_mlflow()  # before hours of training, not after
    experiment = _load(args)
    from tlfusion.pipeline import Pipeline

    run_dir = _run_folder(args, experiment.name)
    args.run_log = setup_logging(run_dir)
    Pipeline(experiment, run_dir, skip_bad=args.skip_bad, force=args.force).run(until=until)
    if track:
        from tlfusion.reports.tracking import track_run, tracking_uri

        run_id = track_run(run_dir, experiment.model_dump(), experiment.name)
        logging.getLogger("tlfusion").info("tracked as MLflow run %s in %s", run_id, tracking_uri())
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from tlfusion.reports.tracking import folder_runs, mlflow_runs, runs_table

    rows = mlflow_runs(args.experiment) if args.mlflow else folder_runs(args.folders or ["runs"])
    if args.experiment and not args.mlflow:
        rows = [row for row in rows if row["experiment"] == args.experiment]
    print(runs_table(rows) if rows else "no runs found")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.experiment, args.data_root = str(DEMO_EXPERIMENT), None
    args.out = args.out or "runs/demo"
    args.skip_bad = False
    return cmd_run(args)


def cmd_data(args: argparse.Namespace) -> int:
    from tlfusion.data.sources import read_sources, summarise

    experiment = _load(args)
    _log_to_stderr()  # what the readers say (e.g. how patients are found); the summary alone on stdout
    summary = summarise(read_sources(experiment.data))
    print(json.dumps({"experiment": experiment.name, **summary}, indent=2, default=str))
    return 0


def _log_to_stderr() -> None:
    """tlfusion's INFO lines on stderr, as `tlfusion: <message>`, for commands without a run folder."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tlfusion: %(message)s"))
    logger = logging.getLogger("tlfusion")
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)


def cmd_stage(stage: str) -> Callable[[argparse.Namespace], int]:
    def run_until(args: argparse.Namespace) -> int:
        return cmd_run(args, until=stage)

    return run_until


def cmd_pretrain(args: argparse.Namespace) -> int:
    from tlfusion.config.pretraining import load_pretraining_config

    load_pretraining_config(args.config, args.overrides)  # a bad file or --set exits 2 before TensorFlow is imported
    import_tensorflow_quietly()
    from tlfusion.training.pretraining import pretrain_and_ship

    pretrain_and_ship(args.config, args.arch, args.out, args.run_dir, args.data_root, args.resume, args.overrides)
    return 0


def _load_bundle(path: str):
    """The bundle at `path`, its trust level ("signed ..." or "integrity only ...") printed on stderr."""
    from tlfusion.bundle.folder import load_bundle

    bundle = load_bundle(path)
    print(f"tlfusion: bundle {path}: {bundle.trust}", file=sys.stderr)
    return bundle


def cmd_predict(args: argparse.Namespace) -> int:
    from tlfusion.commands import readable_images

    paths, skipped = readable_images(args.images, skip_bad=args.skip_bad)  # bad input exits before TensorFlow loads
    import_tensorflow_quietly()
    from tlfusion.commands import predict_images, prediction_summary
    from tlfusion.fileio import write_atomic

    for path, reason in skipped:
        print(f"tlfusion: skipped {path}: {reason}", file=sys.stderr)
    bundle = _load_bundle(args.bundle)
    frame = predict_images(bundle, paths, args.scheduler, args.bundle)
    if args.out:
        write_atomic(args.out, lambda temp: frame.to_csv(temp, index=False))
    else:
        frame.to_csv(sys.stdout, index=False)
    for line in prediction_summary(bundle, frame, args.out, args.scheduler):
        print(f"tlfusion: {line}", file=sys.stderr)
    return 0


def _check_data(args: argparse.Namespace) -> None:
    """Validate `--data`'s experiment before TensorFlow is imported (a config error then takes well under 1 s)."""
    from tlfusion.config.experiment import load_experiment

    load_experiment(args.data, data_root=args.data_root)
    import_tensorflow_quietly()


def cmd_evaluate(args: argparse.Namespace) -> int:
    _check_data(args)
    from tlfusion.commands import evaluate_bundle
    from tlfusion.reports.report import summary_lines

    bundle = _load_bundle(args.bundle)
    metrics = evaluate_bundle(bundle, args.data, args.out, data_root=args.data_root, split=args.split)
    for line in summary_lines(metrics):
        print(line)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    _check_data(args)
    from tlfusion.commands import explain_bundle

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    explain_bundle(
        _load_bundle(args.bundle),
        args.data,
        args.out,
        methods=methods,
        cases=args.cases,
        ids=args.ids,
        data_root=args.data_root,
        split=args.split,
        lime_samples=args.lime_samples,
    )
    return 0


def cmd_fewshot(args: argparse.Namespace) -> int:
    import_tensorflow_quietly()
    from tlfusion.commands import experiment_features, load_feature_table
    from tlfusion.fewshot.evaluation import run_fewshot
    from tlfusion.fileio import write_json

    if args.features:
        X, y, groups = load_feature_table(args.features)
    else:
        X, y, groups = experiment_features(args.data, args.out, args.data_root, args.backbone, args.stages)
    episodes = (args.ways, args.shots, args.queries, args.episodes, args.classifier)
    result = run_fewshot(X, y, groups, *episodes, seed=args.seed)
    write_json(RunPaths(args.out).fewshot, result)
    print(json.dumps({k: result[k] for k in ("ways", "shots", "episodes", "classifier", "auroc", "accuracy")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tlfusion.config.experiment import ExplainSpec, FewshotSpec

    shown, episodes = ExplainSpec(), FewshotSpec()  # one set of defaults: an experiment's `explain` and `fewshot`
    parser = argparse.ArgumentParser(
        prog="tlfusion",
        description="Feature-fusion transfer learning for X-ray classification from small labelled sets.",
    )
    parser.add_argument("--version", action="version", version=f"tlfusion {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="whole pipeline on the bundled data/ sample (a few minutes on CPU)")
    demo.add_argument("--out", help="run folder (default: runs/demo)")
    demo.add_argument("--force", action="store_true", help="re-run every stage even when unchanged")
    _set_argument(demo)
    demo.set_defaults(handler=cmd_demo)

    run = commands.add_parser("run", help="run an experiment's stages (skipping those unchanged)")
    _experiment_arguments(run)
    run.add_argument(
        "--track", choices=["mlflow"], help="log the run to MLflow (MLFLOW_TRACKING_URI, default ./mlruns)"
    )
    run.set_defaults(handler=cmd_run)

    runs = commands.add_parser("runs", help="list and compare runs: run folders, or an MLflow store")
    runs.add_argument("folders", nargs="*", help="run folders, or folders holding them (default: runs)")
    runs.add_argument("--mlflow", action="store_true", help="list the MLflow store's runs instead")
    runs.add_argument("--experiment", help="only this experiment's runs")
    runs.set_defaults(handler=cmd_runs)

    data = commands.add_parser("data", help="read an experiment's data and print a summary")
    _experiment_arguments(data)
    data.set_defaults(handler=cmd_data)

    pretrain = commands.add_parser("pretrain", help="in-domain pretraining of a backbone (supervised or label-free)")
    pretrain.add_argument("config", help="pretraining YAML (e.g. experiments/pretrain_xray.yaml)")
    pretrain.add_argument("--arch", required=True, help="backbone name, e.g. mobilenetv2")
    pretrain.add_argument("--out", required=True, help="folder for the shipped model.keras, MODEL_CARD.md, curves")
    pretrain.add_argument("--run-dir", help="working folder with checkpoints (default: runs/pretrain_<out name>)")
    pretrain.add_argument("--data-root", help="folder the YAML's relative data paths resolve against")
    pretrain.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    _set_argument(pretrain)
    pretrain.set_defaults(handler=cmd_pretrain)

    for stage, text in (
        ("finetune", "fine-tune the experiment's backbones"),
        ("extract", "extract (cached) features"),
        ("fit", "fit and select classifiers on the training split"),
    ):
        parser_ = commands.add_parser(stage, help=f"{text} (runs earlier stages as needed)")
        _experiment_arguments(parser_)
        parser_.set_defaults(handler=cmd_stage(stage))

    evaluate = commands.add_parser("evaluate", help="evaluate a saved bundle on an experiment's data")
    evaluate.add_argument("bundle", help="bundle folder")
    evaluate.add_argument("--data", required=True, help="experiment YAML whose data to evaluate on")
    evaluate.add_argument("--data-root")
    evaluate.add_argument("--split", default="test", help="split to evaluate (train, val, test or all)")
    evaluate.add_argument("--out", required=True, help="folder for metrics.json and the report")
    evaluate.set_defaults(handler=cmd_evaluate)

    predict = commands.add_parser("predict", help="probabilities for images from a saved bundle, as CSV")
    predict.add_argument("bundle", help="bundle folder")
    predict.add_argument("images", nargs="+", help="image files or folders")
    predict.add_argument("--out", help="CSV file (default: standard output)")
    predict.add_argument("--skip-bad", action="store_true", help="report and skip unreadable images")
    predict.add_argument("--scheduler", help="predict on this Dask scheduler's workers (tcp://HOST:8786)")
    predict.set_defaults(handler=cmd_predict)

    explain = commands.add_parser("explain", help="Grad-CAM / LIME images and an HTML review page")
    explain.add_argument("bundle", help="bundle folder")
    explain.add_argument("--data", required=True, help="experiment YAML whose images to explain")
    explain.add_argument("--data-root")
    explain.add_argument("--split", default="test")
    explain.add_argument(
        "--cases", type=int, help=f"number of cases, errors first (default: the experiment's, {shown.cases})"
    )
    explain.add_argument("--ids", nargs="*", help="explain these image paths (or file names) instead")
    methods = ",".join(shown.methods)
    explain.add_argument("--method", default=methods, help="gradcam, lime or both (comma-separated)")
    explain.add_argument(
        "--lime-samples", type=int, help=f"LIME samples per case (default: the experiment's, {shown.lime_samples})"
    )
    explain.add_argument("--out", required=True)
    explain.set_defaults(handler=cmd_explain)

    fewshot = commands.add_parser("fewshot", help="n-way k-shot episodes with distance-based classifiers")
    source = fewshot.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="experiment YAML (images; features extracted and cached)")
    source.add_argument("--features", help="cached feature table (.npz with X, y, groups)")
    fewshot.add_argument("--data-root")
    fewshot.add_argument("--backbone", help="backbone name, .keras file or bundle folder (default: experiment's)")
    for name in ("ways", "shots", "queries", "episodes"):
        fewshot.add_argument(f"--{name}", type=int, default=getattr(episodes, name))
    fewshot.add_argument("--classifier", default=episodes.classifier)
    fewshot.add_argument(
        "--stages", type=int, help="resolution stages pooled per backbone (with --data; default: the experiment's)"
    )
    fewshot.add_argument("--seed", type=int, default=0)
    fewshot.add_argument("--out", required=True)
    fewshot.set_defaults(handler=cmd_fewshot)
    return parser


def _check_out(args: argparse.Namespace) -> None:
    """`--out` must be able to become what the command writes: a CSV file for `predict`, a folder otherwise."""
    out = getattr(args, "out", None)
    if not out or not Path(out).exists():
        return
    if args.command == "predict" and Path(out).is_dir():
        raise InputError(f"--out {out}: is a folder; give the CSV file to write")
    if args.command != "predict" and not Path(out).is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: 0 done, 2 bad input (one line on stderr), 1 internal error (traceback in the run log)."""
    args = build_parser().parse_args(argv)
    configure_process()
    try:
        _check_out(args)
        return args.handler(args)
    except InputError as error:
        message = " ".join(line.strip() for line in str(error).splitlines())  # one line, whatever a library said
        print(f"tlfusion: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlfusion: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        log = getattr(args, "run_log", None)
        log_internal_error(log)
        where = f"traceback in {log}" if log else "traceback above"
        print(f"tlfusion: internal error: {type(error).__name__} ({where}; please report it)", file=sys.stderr)
        return 1
