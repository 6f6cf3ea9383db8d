"""Reading the files the CLI is given: a PSFTJob (YAML or JSON) or a stage config (JSON).

Whatever is wrong with a file itself (missing, a folder, unreadable, too large, binary, not
UTF-8, not YAML, duplicate keys, too deep, alias-expanded past a bound) raises
SpecFileError: one line naming the file, what is wrong and what to do. Its fields are
checked afterwards, by psft.workflows.validate.
"""

from __future__ import annotations

import codecs
import errno
import json
from pathlib import Path
from typing import Any

import yaml

from psft.workflows import safe_yaml
from psft.workflows.errors import UserError, clipped, shown
from psft.workflows.safe_yaml import MAX_DEPTH, MAX_VALUES

MAX_SPEC_BYTES = 1 << 20
"""A PSFTJob file may hold 1 MiB; real ones hold a few KB."""


class SpecFileError(UserError):
    """A file the CLI was given that cannot be read as what it should be."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(clipped(f"{path}: {problem}"))


def describe_os_error(exc: OSError) -> str:
    """What an OSError from opening or reading a file means for the user, and the fix."""
    if exc.errno == errno.ENOENT:
        return "cannot read file: no such file; check the path"
    if exc.errno == errno.EISDIR:
        return "cannot read file: it is a folder; give the path of a PSFTJob YAML or JSON file"
    if exc.errno == errno.ENOTDIR:
        return "cannot read file: a part of its path is a file, not a folder; check the path"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            "cannot read file: permission denied; make it readable (chmod u+r) or run as a "
            "user who may read it"
        )
    reason = (exc.strerror or str(exc)).lower()
    return f"cannot read file: {reason}; check the path"


def _read_bytes(path: Path, limit: int, kind: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise SpecFileError(path, describe_os_error(exc)) from None
    if len(data) > limit:
        raise SpecFileError(
            path,
            f"is larger than {limit // (1 << 20)} MiB, the limit for {kind}: is this the "
            "right file?",
        )
    return data


def _decode(path: Path, data: bytes) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise SpecFileError(path, "is UTF-16 text; save it as UTF-8")
    if b"\x00" in data:
        raise SpecFileError(
            path,
            "is a binary file (it contains NUL bytes), not YAML or JSON text: is this "
            "the right file?",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SpecFileError(
            path,
            f"is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it as UTF-8",
        ) from None


def read_text(path: str | Path, limit: int = MAX_SPEC_BYTES, kind: str = "a PSFTJob file") -> str:
    """The UTF-8 text of a file of at most `limit` bytes; SpecFileError otherwise."""
    path = Path(path)
    return _decode(path, _read_bytes(path, limit, kind))


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        context = f" ({exc.context})" if exc.context else ""
        return f"not valid YAML: {where}: {exc.problem}{context}"
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return (
            f"not valid YAML: line {line}: unacceptable character #x{exc.character:04x} "
            f"({exc.reason}); write it as an escape in a double-quoted string"
        )
    return f"not valid YAML: {exc}"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {shown(key)} appears twice in the same object; keep one")
        out[key] = value
    return out


def _digits(text: str) -> int:
    if len(text) > 4300:  # CPython's int() limit; its error suggests a Python setting
        raise ValueError(f"a number has {len(text)} digits: is this the right file?")
    return int(text)


def _check_size(value: Any) -> None:
    """JSON has no aliases, but the same bounds as YAML apply to its nesting and size."""
    stack, values = [(value, 1)], 0
    while stack:
        node, depth = stack.pop()
        values += 1
        if depth > MAX_DEPTH:
            raise ValueError(safe_yaml.too_deep())
        if values > MAX_VALUES:
            raise ValueError(f"holds more than {MAX_VALUES} values; a PSFTJob has a few hundred")
        children = (
            node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
        )
        stack.extend((child, depth + 1) for child in children)


def parse_json(text: str) -> Any:
    """A JSON document, refused (ValueError, one line) past the YAML loader's bounds."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_int=_digits)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ValueError(safe_yaml.too_deep()) from None
    _check_size(value)
    return value


def read_document(path: str | Path) -> Any:
    """The one YAML document (JSON for `.json` files) of a PSFTJob file, not yet validated."""
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise SpecFileError(
            path, "is empty; a PSFTJob is a YAML mapping of apiVersion, kind, metadata and spec"
        )
    if path.suffix.lower() == ".json":
        try:
            return parse_json(text)
        except ValueError as exc:
            raise SpecFileError(path, f"not valid JSON: {exc}") from None
    try:
        return safe_yaml.load(text)
    except yaml.YAMLError as exc:
        raise SpecFileError(path, _yaml_problem(exc, text)) from None
