"""What a run shows on the console: tlfusion's own lines and one labelled progress bar per long stage.

TensorFlow, Keras, tf2onnx and absl messages (INFO and above) and Python warnings go to `run.log` only.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from tlfusion.run.paths import RunPaths

LIBRARY_LOGGERS = ("tensorflow", "tf2onnx", "absl", "keras", "onnxruntime", "py.warnings")
"""Loggers kept out of the console during a run: run.log gets their INFO and above (tf2onnx's DEBUG is thousands
of lines per graph)."""
PROCESS_ENVIRONMENT = {
    "OMP_WAIT_POLICY": "PASSIVE",  # OpenMP's busy-waiting makes small XGBoost fits many times slower on 2 cores
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow's C++ start-up lines would bury the one-line error messages
    "TQDM_DISABLE": "1",  # LIME's unlabelled tqdm bars; the explain stage shows its own
}
"""Environment defaults of a `tlfusion` process (a variable already set is kept), set before the libraries load."""
T = TypeVar("T")


def configure_process() -> None:
    """Set `PROCESS_ENVIRONMENT`'s defaults; for entry points (the CLI), before TensorFlow, XGBoost or LIME load."""
    for name, value in PROCESS_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with stderr muted: its C++ start-up lines would bury our one-line error messages."""
    if "tensorflow" in sys.modules:
        return
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(null)
        os.close(saved)


def setup_logging(run_dir: Path) -> Path:
    """tlfusion's INFO lines to the console; those, tlfusion's DEBUG lines, library loggers and Python warnings to
    run.log (returned). For entry points (the CLI): a library leaves logging to its caller."""
    from rich.logging import RichHandler

    import_tensorflow_quietly()
    sys.modules["tensorflow"].get_logger()  # TensorFlow adds its own stderr handler on first use: do that now
    run_dir.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(RunPaths(run_dir).log)
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))  # benchmarks.end_to_end reads it
    console = RichHandler(show_path=False, show_time=False, markup=False)
    console.setLevel(logging.INFO)
    _route(logging.getLogger("tlfusion"), [console, file], logging.DEBUG)
    for name in LIBRARY_LOGGERS:
        _route(logging.getLogger(name), [file], logging.INFO)
        logging.getLogger(name).propagate = False
    logging.captureWarnings(True)
    return RunPaths(run_dir).log


def log_internal_error(run_log: Path | None) -> None:
    """The exception being handled, with its traceback: appended to `run_log` (the run's log, when the command set
    one up) or else printed on stderr."""
    if run_log is None:
        traceback.print_exc()
        return
    with open(run_log, "a", encoding="utf-8") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR internal error\n{traceback.format_exc()}")


def _route(logger: logging.Logger, handlers: list[logging.Handler], level: int) -> None:
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.close()
    logger.handlers = list(handlers)
    logger.setLevel(level)


def progress(items: Sequence[T], label: str, describe: Callable[[T], str] = str) -> Iterator[T]:
    """Yield `items` under a progress bar that names the one running and counts those done (cleared at the end)."""
    from rich.progress import Progress

    with Progress(*_columns(), transient=True) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            bar.update(task, description=f"{label} {describe(item)}")
            yield item
            bar.advance(task)


@contextmanager
def activity(label: str) -> Iterator[None]:
    """An activity bar (no count) labelled `label` while the block runs, cleared at the end."""
    from rich.progress import Progress

    with Progress(*_columns(), transient=True) as bar:
        bar.add_task(label, total=None)
        yield


def _columns() -> tuple:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
