"""Moving files and folders to and from S3: concurrent, multipart, verified.

Uploads run several files at once and the parts of a large file in parallel (S3 multipart:
a part upload that fails is retried, an upload that fails for good is aborted, and an
object never becomes visible half-written). A folder gets a manifest object last, listing
every file with its size and ETag. Downloads fetch large objects as parallel byte ranges
into a temporary file that replaces the target only once complete and verified (size, and
the MD5 for single-part ETags).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from psft.trainer.storage.base import MANIFEST, MissingArtifact, StorageError
from psft.trainer.storage.s3client import S3Connection

MiB = 1024 * 1024


@dataclass(frozen=True)
class RemoteFile:
    name: str
    """Object name in the bucket."""
    size: int
    etag: str


@dataclass(frozen=True)
class TransferSettings:
    part_size: int = 16 * MiB
    """Multipart part size and download range size (S3's minimum part is 5 MiB)."""
    file_workers: int = 4
    """Files transferred at once."""
    part_workers: int = 4
    """Parts of one large file transferred at once."""


def _etag(raw: str | None) -> str:
    return (raw or "").strip('"')


def is_single_part_etag(etag: str) -> bool:
    """Plain MD5 ETags (no `-N` suffix) can be checked against the content."""
    return len(etag) == 32 and "-" not in etag


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(folder: Path) -> list[Path]:
    """Files of a folder, largest first (they take longest), skipping our temp files."""
    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".psft-tmp")]
    return sorted(files, key=lambda p: (-p.stat().st_size, str(p)))


class Transfer:
    """Transfers between local paths and one bucket of one S3 connection."""

    def __init__(self, conn: S3Connection, bucket: str, settings: TransferSettings | None = None):
        self.conn = conn
        self.bucket = bucket
        self.settings = settings or TransferSettings()

    @property
    def client(self):
        return self.conn.client

    # metadata ------------------------------------------------------------------------------
    def stat(self, name: str) -> RemoteFile | None:
        """The object `name`, or None when it does not exist."""
        try:
            st = self.conn.call(
                f"reading s3://{self.bucket}/{name}",
                lambda: self.client.stat_object(self.bucket, name),
                bucket=self.bucket,
            )
        except MissingArtifact:
            return None
        return RemoteFile(name, int(st.size or 0), _etag(st.etag))

    def list(self, prefix: str, *, recursive: bool = True) -> list[RemoteFile]:
        """Objects under `prefix` (folders too when not recursive, with size -1)."""

        def listing() -> list[RemoteFile]:
            objects = self.client.list_objects(self.bucket, prefix=prefix, recursive=recursive)
            return [
                RemoteFile(o.object_name, -1 if o.is_dir else int(o.size or 0), _etag(o.etag))
                for o in objects
            ]

        return self.conn.call(f"listing s3://{self.bucket}/{prefix}", listing, bucket=self.bucket)

    def read_bytes(self, name: str) -> bytes:
        def get() -> bytes:
            resp = self.client.get_object(self.bucket, name)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self.conn.call(f"reading s3://{self.bucket}/{name}", get, bucket=self.bucket)

    def write_bytes(self, name: str, data: bytes, content_type: str = "application/json") -> str:
        """One PUT: S3 makes the new object visible atomically, whole or not at all."""
        import io

        result = self.conn.call(
            f"writing s3://{self.bucket}/{name}",
            lambda: self.client.put_object(
                self.bucket, name, io.BytesIO(data), len(data), content_type=content_type
            ),
            bucket=self.bucket,
        )
        return _etag(result.etag)

    def delete(self, names: Iterable[str]) -> None:
        from minio.deleteobjects import DeleteObject

        batch = [DeleteObject(n) for n in names]
        if not batch:
            return

        def remove() -> list[str]:
            errors = self.client.remove_objects(self.bucket, batch)
            return [f"{e.name}: {e.code}" for e in errors]

        failed = self.conn.call(f"deleting in s3://{self.bucket}", remove, bucket=self.bucket)
        if failed:
            raise StorageError(f"could not delete from s3://{self.bucket}: {', '.join(failed)}")

    # uploads -------------------------------------------------------------------------------
    def upload_file(self, path: Path, name: str) -> RemoteFile:
        size = path.stat().st_size
        s = self.settings
        parallel = s.part_workers if size > s.part_size else 1
        result = self.conn.call(
            f"uploading {path.name} to s3://{self.bucket}/{name}",
            lambda: self.client.fput_object(
                self.bucket, name, str(path), part_size=s.part_size, num_parallel_uploads=parallel
            ),
            bucket=self.bucket,
        )
        return RemoteFile(name, size, _etag(result.etag))

    def upload_folder(self, folder: Path, prefix: str) -> dict[str, RemoteFile]:
        """All files of `folder` under `prefix/`, then the manifest naming them."""
        files = local_files(folder)
        if not files:
            raise StorageError(f"cannot upload {folder}: the folder is empty")
        rel = {p: p.relative_to(folder).as_posix() for p in files}
        # a folder being replaced stops looking complete until its new manifest lands
        self.delete([f"{prefix}/{MANIFEST}"])
        with ThreadPoolExecutor(max_workers=self.settings.file_workers) as pool:
            uploaded = dict(
                zip(
                    (rel[p] for p in files),
                    pool.map(lambda p: self.upload_file(p, f"{prefix}/{rel[p]}"), files),
                    strict=True,
                )
            )
        manifest = {
            "files": {k: {"size": v.size, "etag": v.etag} for k, v in sorted(uploaded.items())}
        }
        self.write_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        return uploaded

    # downloads -----------------------------------------------------------------------------
    def download_file(self, remote: RemoteFile, target: Path) -> None:
        """Fetch `remote` into `target` (replaced only once complete and verified)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".psft-tmp-", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            os.ftruncate(fd, remote.size)
            ranges = self._ranges(remote.size)
            if len(ranges) <= 1:
                self._fetch_range(remote, fd, 0, remote.size)
            else:
                with ThreadPoolExecutor(max_workers=self.settings.part_workers) as pool:
                    list(pool.map(lambda r: self._fetch_range(remote, fd, *r), ranges))
            os.close(fd)
            fd = -1
            self._verify(remote, tmp)
            os.replace(tmp, target)
        finally:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)

    def _ranges(self, size: int) -> list[tuple[int, int]]:
        step = self.settings.part_size
        return [(off, min(step, size - off)) for off in range(0, size, step)]

    def _fetch_range(self, remote: RemoteFile, fd: int, offset: int, length: int) -> None:
        if length == 0:
            return

        def get() -> None:
            resp = self.client.get_object(self.bucket, remote.name, offset=offset, length=length)
            try:
                pos = offset
                for chunk in resp.stream(1 * MiB):
                    os.pwrite(fd, chunk, pos)
                    pos += len(chunk)
                if pos != offset + length:
                    raise OSError(f"short read: {pos - offset} of {length} bytes")
            finally:
                resp.close()
                resp.release_conn()

        self.conn.call(f"downloading s3://{self.bucket}/{remote.name}", get, bucket=self.bucket)

    def _verify(self, remote: RemoteFile, path: Path) -> None:
        size = path.stat().st_size
        if size != remote.size:
            raise StorageError(
                f"s3://{self.bucket}/{remote.name}: downloaded {size} bytes, expected {remote.size}"
            )
        if is_single_part_etag(remote.etag) and md5_of(path) != remote.etag:
            raise StorageError(
                f"s3://{self.bucket}/{remote.name}: content does not match its ETag "
                "(corrupted in transfer or changed while downloading); retry"
            )

    def download_many(self, pairs: list[tuple[RemoteFile, Path]]) -> None:
        with ThreadPoolExecutor(max_workers=self.settings.file_workers) as pool:
            list(pool.map(lambda pair: self.download_file(*pair), pairs))


class EtagIndex:
    """Which local files are known copies of which object versions (name -> etag, size).

    Lets a store skip downloads of files it already has (it uploaded them, or fetched them
    earlier), while a changed object (new ETag) is fetched again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._data: dict[str, list] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self._data = {}

    def fresh(self, remote: RemoteFile, local: Path) -> bool:
        known = self._data.get(remote.name)
        return (
            known == [remote.etag, remote.size]
            and local.is_file()
            and local.stat().st_size == remote.size
        )

    def record(self, remotes: Iterable[RemoteFile]) -> None:
        with self._lock:
            for r in remotes:
                self._data[r.name] = [r.etag, r.size]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # a name of this process' own: the processes of one node (the training
            # workers of a multi-node run) share the run's mirror and this index
            tmp = self.path.with_name(f".psft-tmp-{os.getpid()}-{self.path.name}")
            tmp.write_text(json.dumps(self._data))
            os.replace(tmp, self.path)

    def forget(self, names: Iterable[str]) -> None:
        with self._lock:
            for n in names:
                self._data.pop(n, None)
