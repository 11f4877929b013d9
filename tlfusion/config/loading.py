"""Configuration files: strict YAML, `--set key=value` overrides and schema validation with readable errors."""

from __future__ import annotations

import difflib
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from tlfusion.errors import InputError

ModelT = TypeVar("ModelT", bound=BaseModel)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" for the closest of `choices` to `word`, or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(choice) for choice in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping with the same key twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys are overridden, not duplicated
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> Any:
    """Safe YAML (no python tags, no duplicate keys); an error raises InputError naming `where`, on one line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{where}: not valid YAML ({problem}{line})") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise InputError(f"--set {text!r}: expected key=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), parse_yaml(value, f"--set {key.strip()}")


def apply_override(raw: dict, text: str) -> None:
    """Set a dotted key (`finetune.epochs=3`, `backbones.0.name=mobilenetv2`) in the raw YAML mapping."""
    keys, value = _parse_override(text)
    node: Any = raw
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise InputError(f"--set {text!r}: {'.'.join(keys[: depth + 1])} is not an index of the list")
            key = int(key)
        elif not isinstance(node, dict):
            raise InputError(f"--set {text!r}: {'.'.join(keys[:depth])} is not a section")
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]


def _first_error(path: Path, error: ValidationError, schema: type[BaseModel]) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        message = "unknown key" + did_you_mean(first["loc"][-1], _keys_beside(first["loc"], schema))
    else:
        message = first["msg"]
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{path}: {where}: {message}{more}"


def _keys_beside(loc: tuple, schema: type[BaseModel]) -> list[str]:
    """The keys the section holding `loc`'s last key accepts ([] when that section is not a schema model)."""
    model: type[BaseModel] | None = schema
    for part in loc[:-1]:
        if isinstance(part, str):
            field = model.model_fields.get(part) if model else None
            model = _section_model(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The schema model in a field's annotation (`DataSpec` in `list[DataSpec]`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_section_model, get_args(annotation))), None)


def read_mapping(path: Path, what: str) -> dict:
    """The top-level YAML mapping of a settings file (InputError naming `path` when missing, not UTF-8 or not a
    mapping)."""
    if not path.is_file():
        raise InputError(f"{path}: {what} file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not a UTF-8 text file (byte {error.start}); {what} files are YAML text") from None
    raw = parse_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of settings at the top level")
    return raw


def validate(schema: type[ModelT], raw: dict, path: Path) -> ModelT:
    try:
        return schema.model_validate(raw)
    except ValidationError as error:
        raise InputError(_first_error(path, error, schema)) from None
