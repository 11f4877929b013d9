"""The `tlfusion` entry point: exit codes for internal errors, and process set-up done there, not at import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import tlfusion
from tlfusion import cli
from tlfusion.console import PROCESS_ENVIRONMENT


def test_an_internal_error_exits_1_with_its_traceback_in_the_run_log(tmp_path, folder_dataset, monkeypatch, capsys):
    """A ValueError (InputError's base class) from inside a run is an internal error: exit 1, not 2."""
    from tlfusion.pipeline import Pipeline

    def broken(self, until=None):
        raise ValueError("a programming mistake")

    monkeypatch.setattr(Pipeline, "run", broken)
    raw = {"name": "t", "positive_class": "abnormal", "data": {"format": "folder", "root": str(folder_dataset)}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({**raw, "backbones": [{"name": "mobilenetv2"}]}))

    code = cli.main(["run", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "run")])

    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(error) == 1
    log_path = tmp_path / "run" / "run.log"
    assert error[0] == f"tlfusion: internal error: ValueError (traceback in {log_path}; please report it)"
    log = log_path.read_text()
    assert "ERROR internal error\nTraceback (most recent call last):" in log
    assert log.rstrip().endswith("ValueError: a programming mistake")


def test_an_internal_error_without_a_run_log_prints_its_traceback(monkeypatch, capsys):
    def broken(args):
        raise TypeError("no run folder here")

    monkeypatch.setattr(cli, "_check_out", broken)
    code = cli.main(["predict", "bundle", "image.png"])
    error = capsys.readouterr().err
    assert code == 1 and "Traceback (most recent call last):" in error and "TypeError: no run folder here" in error
    assert error.rstrip().splitlines()[-1] == "tlfusion: internal error: TypeError (traceback above; please report it)"


def test_importing_tlfusion_changes_no_process_state(tmp_path):
    """Environment variables and the umask are the CLI's to set (`console.configure_process`), not an import's."""
    code = """
        import os
        mask = os.umask(0o027)
        import tlfusion, tlfusion.config.experiment, tlfusion.console, tlfusion.fileio, tlfusion.training.provenance
        from tlfusion.console import PROCESS_ENVIRONMENT, configure_process
        tlfusion.fileio.write_text("out.txt", "x")
        set_by_import = [name for name in PROCESS_ENVIRONMENT if name in os.environ]
        print(set_by_import, os.umask(mask) == 0o027, oct(os.stat("out.txt").st_mode & 0o777))
        configure_process()
        print(os.environ["OMP_WAIT_POLICY"], os.environ["TF_CPP_MIN_LOG_LEVEL"])
    """
    env = {key: value for key, value in os.environ.items() if key not in PROCESS_ENVIRONMENT}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[] True 0o640", "PASSIVE 3"]


def test_command_defaults_are_the_experiment_defaults():
    """One set of defaults: `tlfusion explain` / `fewshot` options default to the `explain` / `fewshot` sections';
    `--cases` and `--lime-samples` to the experiment's own (None here, resolved by `commands.explain_bundle`)."""
    from tlfusion.config.experiment import ExplainSpec, FewshotSpec

    parser = cli.build_parser()
    explain = parser.parse_args(["explain", "b", "--data", "e.yaml", "--out", "o"])
    assert (explain.cases, explain.lime_samples, explain.method.split(",")) == (None, None, ExplainSpec().methods)
    fewshot = vars(parser.parse_args(["fewshot", "--features", "f.npz", "--out", "o"]))
    names = {"ways", "shots", "queries", "episodes", "classifier"}
    assert {name: fewshot[name] for name in names} == FewshotSpec().model_dump(include=names)


def test_the_demo_experiment_and_its_data_are_package_data():
    """`tlfusion demo` reads tlfusion/demo/demo.yaml and tlfusion/demo/sample, inside the package, so an installed
    wheel has them: pyproject's package-data patterns cover every file there, and the experiment agrees with
    experiments/demo.yaml (the same experiment for a checkout, on the same files through data/sample)."""
    from tlfusion.config.experiment import load_experiment

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    package = Path(tlfusion.__file__).resolve().parent
    assert package / "demo" / "demo.yaml" == cli.DEMO_EXPERIMENT
    demo = load_experiment(cli.DEMO_EXPERIMENT)
    assert Path(demo.data[0].root) == package / "demo" / "sample"
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["tlfusion"]
    files = {path for path in (package / "demo").rglob("*") if path.is_file()}
    assert len(files) == 202 and files <= {path for pattern in patterns for path in package.glob(pattern)}
    checkout = load_experiment(package.parent / "experiments" / "demo.yaml")
    assert checkout.model_dump() == demo.model_dump()


def _imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The tlfusion modules a source file imports, at module or function level, type-only (`if TYPE_CHECKING:`)
    imports included."""
    import ast

    found = set()
    todo = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found.update({name for name in names if name in modules} or {node.module})
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        todo += ast.iter_child_nodes(node)
    return found & modules


def _import_graph() -> dict[str, set[str]]:
    """Each tlfusion module -> the tlfusion modules it imports (module or function level; the package's lazy
    `__getattr__` left out)."""
    package = Path(tlfusion.__file__).resolve().parent
    files = {
        ".".join(("tlfusion", *path.relative_to(package).with_suffix("").parts)).removesuffix(".__init__"): path
        for path in package.rglob("*.py")
    }
    return {name: _imported_modules(path, set(files)) - {name, "tlfusion"} for name, path in files.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module an import chain from `start` reaches."""
    seen, todo = set(), list(graph[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += graph[name]
    return seen


LOWER_FLOORS = ("errors", "fileio", "config.names", "evaluation.metrics", "data", "features.cache", "features.runners")
LOWER_FLOORS += ("features.extraction", "features.source", "features.fusion", "features.onnx_graphs", "models")
LOWER_FLOORS += ("backbones", "run.paths")
UPPER_FLOORS = ("cli", "api", "commands", "pipeline", "stages", "evaluation.results", "reports", "explain", "bundle")


def test_no_import_cycle_and_no_upward_import():
    """The command line sits on top: only `__main__` imports `tlfusion.cli`; no chain of imports, at module or
    function level, leads from a module back to itself; and no chain leads from a lower floor to an upper one."""
    graph = _import_graph()
    assert sorted(name for name, imported in graph.items() if "tlfusion.cli" in imported) == ["tlfusion.__main__"]
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert cycles == [], f"modules on an import cycle: {cycles}"

    def floor(name: str, floors: tuple[str, ...]) -> bool:
        return any(name == f"tlfusion.{top}" or name.startswith(f"tlfusion.{top}.") for top in floors)

    upward = {name: sorted(n for n in _reachable(graph, name) if floor(n, UPPER_FLOORS)) for name in graph}
    assert {name: found for name, found in upward.items() if floor(name, LOWER_FLOORS) and found} == {}


def test_a_bad_pretraining_yaml_exits_2_before_tensorflow_is_imported(tmp_path):
    (tmp_path / "pretrain.yaml").write_text("epoch: 3\nsources: [{name: a, csv: a.csv}]\n")
    argv = ["pretrain", str(tmp_path / "pretrain.yaml"), "--arch", "mobilenetv2", "--out", str(tmp_path / "out")]
    code = f"import sys\nfrom tlfusion.cli import main\ncode = main({argv!r})\nprint('tensorflow' in sys.modules)"
    code += "\nsys.exit(code)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "False\n")
    assert (
        done.stderr == f"tlfusion: error: {tmp_path / 'pretrain.yaml'}: epoch: unknown key (did you mean 'epochs'?)\n"
    )
    assert not (tmp_path / "out").exists()
