"""Local paths from a spec or the command line, resolved one way everywhere.

A value that is not an `s3://` URI names a local path: `~` and `~user` expand to a home
folder, and a `file:` URI (`file:///data/x.jsonl`, `file:/data/x.jsonl`,
`file://localhost/data/x.jsonl`, percent-escapes decoded) to the absolute path it names.
Relative paths stay relative to the folder psft runs in. A value that names no usable path
raises PathProblem, whose message says why and what to write instead.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from psft.workflows.errors import shown
from psft.workflows.formats import BUCKET_FORMAT, DOT_SEGMENT

if TYPE_CHECKING:
    from psft.workflows.spec import PSFTJob

S3_SCHEME = "s3://"
MAX_S3_KEY_BYTES = 1024
"""S3's limit on the UTF-8 length of an object key."""
MAX_PATH_BYTES = 4096
"""Linux's PATH_MAX: the longest path a system call accepts."""
MAX_NAME_BYTES = 255
"""Linux's NAME_MAX: the longest file or folder name."""

_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_FILE_SCHEME = re.compile(r"^file:", re.IGNORECASE)


class PathProblem(ValueError):
    """A value that names no usable local path; the message says why and what to write."""


def is_s3_uri(value: str) -> bool:
    return value.startswith(S3_SCHEME)


def s3_uri_problem(value: str) -> str | None:
    """Why an `s3://` URI names no object psft can fetch, or None: no bucket, a bucket name S3
    refuses, a key that is not UTF-8 or too long, or a `.`/`..` segment in the key (S3 keeps
    it as written, but the download cache is a folder, where `..` climbs out of it)."""
    bucket, _, key = value.removeprefix(S3_SCHEME).partition("/")
    if not bucket:
        return f"{shown(value)} names no bucket; write s3://<bucket>/<path>"
    problem = BUCKET_FORMAT.problem(bucket)
    if problem:
        return f"{shown(value)}: the bucket {shown(bucket)} {problem}"
    if re.search(DOT_SEGMENT, key):
        return (
            f"{shown(value)} has a '.' or '..' segment in its key: S3 keeps it as written, but "
            "psft's download cache is a folder where '..' leads out of it; write the key "
            "without such segments"
        )
    if any(unicodedata.category(c) == "Cc" for c in key):
        return f"{shown(value)} contains a control character; write the key without it"
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        return f"{shown(value)} contains a character that is not valid UTF-8; S3 keys are UTF-8"
    if size > MAX_S3_KEY_BYTES:
        return f"{shown(value)} has a key of {size} bytes; S3 accepts at most {MAX_S3_KEY_BYTES}"
    return None


def _path_of_file_uri(value: str) -> str:
    parts = urlsplit(value)
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise PathProblem(
            f"{shown(value)} has a '?' or '#'; in a file:// URI write them as %3F and %23"
        )
    if parts.netloc not in ("", "localhost"):
        suggestion = f"file:///{parts.netloc}{parts.path}"
        raise PathProblem(
            f"{shown(value)} names the host {parts.netloc!r}, but only files on this machine "
            f"can be read: for the path /{parts.netloc}{parts.path} write {shown(suggestion)} "
            "(three slashes)"
        )
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise PathProblem(
            f"{shown(value)}: a file: URI names an absolute path (file:///data/x.jsonl); "
            "write a relative path without 'file:'"
        )
    return path


def _check_encodable(text: str, value: str) -> None:
    if "\x00" in text:
        raise PathProblem(f"{shown(value)} contains a NUL character; write the path without it")
    try:
        encoded = os.fsencode(text)
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end]
        raise PathProblem(
            f"{shown(value)} contains {bad!r}, which cannot be part of a file name"
        ) from None
    if len(encoded) > MAX_PATH_BYTES:
        raise PathProblem(
            f"{shown(value)} is longer than {MAX_PATH_BYTES} bytes, the longest path this "
            "system accepts"
        )
    for name in encoded.split(b"/"):
        if len(name) > MAX_NAME_BYTES:
            raise PathProblem(
                f"{shown(value)} has a file or folder name of {len(name)} bytes, longer than "
                f"the {MAX_NAME_BYTES} bytes this system accepts"
            )


def _expand_home(text: str, value: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError:  # `~name` of no user on this machine
        user = text[1:].partition("/")[0]
        raise PathProblem(
            f"{shown(value)}: there is no user {user!r} on this machine, so '~{user}' names no "
            "home folder; write the full path"
        ) from None


def local_path(value: str) -> Path:
    """The local path `value` names: `~` expanded, a `file:` URI decoded.

    Raises PathProblem for a value that names none: empty, a NUL or unencodable character,
    too long for the system, a URI of another scheme or host, or `~user` of no user.
    """
    if not value.strip():
        raise PathProblem("is empty; write a path such as 'data/train.jsonl'")
    scheme = _URI_SCHEME.match(value)
    if scheme and scheme.group(1).lower() != "file":
        raise PathProblem(
            f"{shown(value)}: {scheme.group(1)}:// URIs are not supported; use a local path, a "
            "file:// URI or an s3:// URI"
        )
    if _FILE_SCHEME.match(value):
        text = _path_of_file_uri(value)
        _check_encodable(text, value)
        return Path(text)
    _check_encodable(value, value)
    return _expand_home(value, value)


def s3_uri_in_local_folder(value: str) -> str:
    return (
        f"{shown(value)} is an S3 URI, but this is a local folder: for S3 set "
        "spec.storage.type: s3 and spec.storage.s3"
    )


def local_folder(value: str) -> Path:
    """`local_path` of a folder psft writes runs under: never the root folder."""
    path = local_path(value)
    if path.resolve() == Path("/"):
        raise PathProblem(f"{shown(value)} is the root folder '/'; name a folder such as 'runs'")
    return path


# Fields of a PSFTJob (wire names, `[]`: every item of a list) that hold local paths.
@dataclass(frozen=True)
class PathField:
    keys: tuple[str, ...]
    s3_allowed: bool = True
    folder: bool = False
    """A folder psft writes into: the root folder is refused."""


STORAGE_LOCAL_PATH = PathField(("spec", "storage", "local", "path"), False, folder=True)
PATH_FIELDS = (
    PathField(("spec", "model", "source")),
    PathField(("spec", "dataset", "train", "[]")),
    PathField(("spec", "dataset", "validation", "files", "[]")),
    PathField(("spec", "grpo", "prompts", "[]")),
    PathField(("spec", "eval", "benchmarks", "[]", "path")),
    STORAGE_LOCAL_PATH,
    PathField(("spec", "storage", "s3", "caBundle"), s3_allowed=False),
)


@dataclass(frozen=True)
class PathValue:
    field: PathField
    where: str
    """The field path as messages write it, e.g. `spec.dataset.train[0]`."""
    holder: dict[str, Any] | list[Any]
    key: str | int
    value: str


def path_values(doc: Any, fields: tuple[PathField, ...] = PATH_FIELDS) -> Iterator[PathValue]:
    """Every string a wire-format PSFTJob document holds in a path field."""
    for field in fields:
        yield from _walk(doc, field, field.keys, "")


def _walk(node: Any, field: PathField, keys: tuple[str, ...], where: str) -> Iterator[PathValue]:
    key, rest = keys[0], keys[1:]
    if key == "[]":
        items = list(enumerate(node)) if isinstance(node, list) else []
    else:
        items = [(key, node[key])] if isinstance(node, dict) and key in node else []
    for k, child in items:
        here = f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else k
        if rest:
            yield from _walk(child, field, rest, here)
        elif isinstance(child, str):
            yield PathValue(field, here, node, k, child)


def path_value_problem(item: PathValue) -> str | None:
    """Why the value of a path field names nothing usable, or None."""
    if is_s3_uri(item.value):
        if not item.field.s3_allowed:
            if item.field == STORAGE_LOCAL_PATH:
                return s3_uri_in_local_folder(item.value)
            return f"{shown(item.value)} is an S3 URI; give the path of a local file"
        return s3_uri_problem(item.value)
    try:
        (local_folder if item.field.folder else local_path)(item.value)
    except PathProblem as exc:
        return str(exc)
    return None


def _needs_resolving(value: str) -> bool:
    return value.startswith("~") or bool(_FILE_SCHEME.match(value))


def with_local_paths_resolved(job: PSFTJob) -> PSFTJob:
    """The job with every `~` path and `file:` URI of its path fields written as the path it
    names on this machine; other values (relative paths, s3:// URIs, registered model
    names) are kept as written. Raises PathProblem for a value that names no path."""
    wire = job.to_wire()
    changed = False
    for item in path_values(wire):
        if _needs_resolving(item.value):
            item.holder[item.key] = str(local_path(item.value))
            changed = True
    return type(job).model_validate(wire) if changed else job
