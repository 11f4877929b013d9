"""Bad experiment files and `--set` values through the real `tlfusion` entry point: exit 2, one line naming the key."""

from __future__ import annotations

import pytest

from tests.conftest import assert_one_line_error, run_cli


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), "not a UTF-8 text file"),
        ("name: caf\xe9\n".encode("latin-1"), "not a UTF-8 text file"),
        (b"name: a\npositive_class: b\nname: c\n", "duplicate key 'name' at line 3"),
    ],
    ids=["elf", "latin-1", "duplicate-key"],
)
def test_unreadable_experiment_file_exits_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    code, error = run_cli(capsys, "data", path)
    assert_one_line_error(code, error, "bad.yaml", message)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("finetune.epochs=[1", "--set finetune.epochs"),
        ("name=!!python/object/apply:os.system [echo owned]", "--set name"),
        ("split={test_fraction: 0.1, test_fraction: 0.2}", "duplicate key 'test_fraction'"),
    ],
    ids=["invalid-yaml", "python-tag", "duplicate-key"],
)
def test_bad_set_value_exits_2(experiment, capsys, override, key):
    code, error = run_cli(capsys, "data", experiment, "--set", override)
    assert_one_line_error(code, error, key)
