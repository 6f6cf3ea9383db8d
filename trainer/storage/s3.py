"""S3 storage (MinIO, SeaweedFS, AWS): the run lives at `s3://bucket/<prefix>/<ns>/<job>/<uid>/`.

Stages work in a local mirror (`work_dir`); `pull` downloads what they read, `push`
uploads what they wrote. Checkpoints follow the marker protocol: upload every file of
`<stage>/checkpoints/step-N/` and its manifest, then PUT the `latest` marker naming N
(one PUT is atomic in S3). Readers trust only the marker, so a crash or an outage
between the files and the marker leaves the previous checkpoint in force.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from psft.trainer.storage.base import (
    MANIFEST,
    STEP_DIR,
    CheckpointFolders,
    MissingArtifact,
    StorageError,
    marker_body,
    parse_marker,
    prune_step_folders,
    validate_key,
)
from psft.trainer.storage.s3client import RetryPolicy, S3Connection
from psft.trainer.storage.transfer import EtagIndex, RemoteFile, Transfer, TransferSettings
from psft.workflows import layout
from psft.workflows.spec import S3Storage
from psft.workflows.stages import StageConfig

log = logging.getLogger("psft.storage")

CACHE_ENV = "PSFT_CACHE_DIR"
INDEX = ".psft-etags.json"

_current: S3Storage | None = None
"""Connection settings of the run store a stage opened (for `fetch_uri` of s3:// inputs)."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; key may be empty."""
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise StorageError(f"{uri!r}: no bucket name (expected s3://bucket/path)")
    return bucket, key.strip("/")


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "psft"


class S3RunStore(CheckpointFolders):
    """A run stored in an S3 bucket, mirrored in a local work folder."""

    def __init__(
        self,
        conn: S3Connection,
        root_uri: str,
        work_dir: Path,
        *,
        keep_checkpoints: int = 2,
        settings: TransferSettings | None = None,
    ) -> None:
        self.conn = conn
        self.bucket, self.prefix = parse_s3_uri(root_uri)
        self.transfer = Transfer(conn, self.bucket, settings)
        self.keep_checkpoints = keep_checkpoints
        self.work_dir = Path(work_dir).expanduser().resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._index = EtagIndex(self.work_dir / INDEX)

    @classmethod
    def from_config(
        cls,
        config: StageConfig,
        *,
        policy: RetryPolicy | None = None,
        settings: TransferSettings | None = None,
    ) -> S3RunStore:
        global _current
        s3 = config.job.spec.storage.s3
        if s3 is None:
            raise StorageError(
                f"run root {config.run_root} is on S3 but spec.storage.s3 is not set"
            )
        conn = S3Connection(s3, policy=policy)
        bucket, prefix = parse_s3_uri(config.run_root)
        conn.ensure_bucket(bucket, create=s3.create_bucket)
        host = conn.endpoint.replace(":", "_")
        work = (
            Path(config.work_dir)
            if config.work_dir
            else cache_root() / "runs" / host / bucket / prefix
        )
        _current = s3
        return cls(
            conn,
            config.run_root,
            work,
            keep_checkpoints=config.job.spec.psft.keep_checkpoints,
            settings=settings,
        )

    @property
    def root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        return f"S3RunStore({self.root!r} at {self.conn.endpoint}, work_dir={str(self.work_dir)!r})"

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def local_path(self, key: str) -> Path:
        return self.work_dir / validate_key(key)

    # reading ------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        name = self._name(validate_key(key))
        if self.transfer.stat(name) is not None:
            return True
        return bool(self.transfer.list(name + "/", recursive=False))

    def pull(self, key: str) -> Path:
        key = validate_key(key)
        name = self._name(key)
        target = self.local_path(key)
        remote = self.transfer.stat(name)
        if remote is not None:
            if not self._index.fresh(remote, target):
                self.transfer.download_file(remote, target)
                self._index.record([remote])
            return target
        files = self._folder_files(name)
        if not files:
            raise MissingArtifact(
                f"{key} is missing from the run at {self.root}; "
                "run the stage that produces it first"
            )
        todo = [(r, target / r.name[len(name) + 1 :]) for r in files]
        todo = [(r, p) for r, p in todo if not self._index.fresh(r, p)]
        self.transfer.download_many(todo)
        self._index.record(r for r, _ in todo)
        return target

    def folders(self, key: str) -> list[str]:
        name = self._name(validate_key(key))
        entries = self.transfer.list(name + "/", recursive=False)
        return sorted(e.name[len(name) + 1 :].rstrip("/") for e in entries if e.size < 0)

    def _folder_files(self, name: str) -> list[RemoteFile]:
        """Files of folder `name`: those its manifest lists (verified), else a listing."""
        listed = {r.name: r for r in self.transfer.list(name + "/")}
        manifest = listed.pop(f"{name}/{MANIFEST}", None)
        if manifest is None:
            return list(listed.values())
        entries = json.loads(self.transfer.read_bytes(manifest.name))["files"]
        files = []
        for rel, meta in entries.items():
            remote = listed.get(f"{name}/{rel}")
            if remote is None or remote.size != meta["size"] or remote.etag != meta["etag"]:
                raise StorageError(
                    f"s3://{self.bucket}/{name}/{rel} is missing or differs from the folder's "
                    f"manifest; the folder was changed after upload. Push it again."
                )
            files.append(remote)
        return files

    # writing ------------------------------------------------------------------------------
    def push(self, key: str) -> None:
        key = validate_key(key)
        path = self.local_path(key)
        if path.is_file():
            self._index.record([self.transfer.upload_file(path, self._name(key))])
        elif path.is_dir():
            uploaded = self.transfer.upload_folder(path, self._name(key))
            self._index.record(uploaded.values())
        else:
            raise MissingArtifact(f"cannot publish {key}: {path} does not exist")

    def remove(self, key: str) -> None:
        key = validate_key(key)
        objects = [r.name for r in self.transfer.list(self._name(key) + "/")]
        # the manifest first: a half-deleted folder never looks complete
        manifest = self._name(f"{key}/{MANIFEST}")
        self.transfer.delete([n for n in objects if n == manifest])
        self.transfer.delete([n for n in objects if n != manifest])
        self._index.forget(objects)
        shutil.rmtree(self.local_path(key), ignore_errors=True)

    def commit_checkpoint(self, stage: str, step: int) -> None:
        key = layout.checkpoint(stage, step)
        folder = self.local_path(key)
        if not folder.is_dir() or not any(folder.iterdir()):
            raise StorageError(
                f"cannot commit checkpoint {step} of {stage}: {folder} is missing or empty"
            )
        self.push(key)  # every file, then the manifest
        metrics = layout.metrics(stage)
        if self.local_path(metrics).is_file():  # the record up to here, before the marker
            self.push(metrics)
        self.transfer.write_bytes(self._name(layout.latest_marker(stage)), marker_body(step))
        log.info("checkpoint %s of %s committed to %s", step, stage, self.root)
        try:
            self._prune(stage, step)
        except StorageError as exc:  # the checkpoint is safe; pruning retries next time
            log.warning("pruning old checkpoints of %s failed: %s", stage, exc)

    def latest_checkpoint(self, stage: str) -> int | None:
        name = self._name(layout.latest_marker(stage))
        try:
            body = self.transfer.read_bytes(name)
        except MissingArtifact:
            return None
        return parse_marker(body, f"s3://{self.bucket}/{name}")

    def _prune(self, stage: str, latest: int) -> None:
        prune_step_folders(self, layout.checkpoints(stage), STEP_DIR, latest, self.keep_checkpoints)


def fetch_s3_uri(
    uri: str,
    cache_dir: Path | None = None,
    *,
    storage: S3Storage | None = None,
    config: StageConfig | None = None,
    policy: RetryPolicy | None = None,
) -> Path:
    """Download the object or folder `uri` once into the cache, verified by size and ETag.

    The endpoint comes from `storage`, else the stage config's `storage.s3`, else the run
    store this process opened, else `$AWS_ENDPOINT_URL`.
    """
    bucket, key = parse_s3_uri(uri)
    settings = _settings_for(uri, bucket, storage, config)
    conn = S3Connection(settings, policy=policy)
    transfer = Transfer(conn, bucket)
    root = cache_root(cache_dir) / "s3" / conn.endpoint.replace(":", "_")
    index = EtagIndex(root / INDEX)
    target = root / bucket / key if key else root / bucket
    remote = transfer.stat(key) if key else None
    if remote is not None:
        pairs = [(remote, target)]
    else:
        prefix = f"{key}/" if key else ""
        files = [r for r in transfer.list(prefix) if not r.name.endswith(f"/{MANIFEST}")]
        if not files:
            raise MissingArtifact(
                f"{uri} does not exist at {conn.endpoint} (no object, no folder with that prefix)"
            )
        pairs = [(r, target / r.name[len(prefix) :]) for r in files]
    todo = [(r, p) for r, p in pairs if not index.fresh(r, p)]
    if todo:
        log.info("downloading %d file(s) of %s into %s", len(todo), uri, target)
        transfer.download_many(todo)
        index.record(r for r, _ in todo)
    return target


def _settings_for(
    uri: str, bucket: str, storage: S3Storage | None, config: StageConfig | None
) -> S3Storage:
    if storage is not None:
        return storage
    if config is not None and config.job.spec.storage.s3 is not None:
        return config.job.spec.storage.s3
    if _current is not None:
        return _current
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        return S3Storage(
            endpoint=endpoint,
            bucket=bucket,
            region=os.environ.get("AWS_REGION", "us-east-1"),
            secure=not endpoint.startswith("http://"),
        )
    raise StorageError(
        f"{uri}: no S3 endpoint known; set spec.storage.s3 (endpoint, bucket) or "
        "$AWS_ENDPOINT_URL (e.g. http://minio:9000)"
    )
