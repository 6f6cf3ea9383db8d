"""`fetch_uri`: model and dataset inputs given as local paths or `s3://` URIs."""

from __future__ import annotations

from pathlib import Path

from psft.workflows.errors import UserError
from psft.workflows.paths import PathProblem, local_path


def local_input(value: str) -> Path:
    """The local path a spec or config value names, resolved as everywhere else in psft
    (`~` expanded, `file:` URIs decoded: psft.workflows.paths); a UserError otherwise."""
    try:
        return local_path(value)
    except PathProblem as exc:
        raise UserError(str(exc)) from None


def fetch_uri(uri: str, cache_dir: Path | None = None, **s3_options: object) -> Path:
    """A local path for `uri`: `s3://` objects or folders are downloaded once into a cache
    and verified by size and ETag; anything else (a path, a registered model name) passes
    through unchanged, so the caller reports a missing local file in its own terms."""
    if uri.startswith("s3://"):
        from psft.trainer.storage.s3 import fetch_s3_uri

        return fetch_s3_uri(uri, cache_dir=cache_dir, **s3_options)  # type: ignore[arg-type]
    return local_input(uri)
