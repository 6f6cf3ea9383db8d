"""An S3 connection for a stage: credentials, the minio client, retries and clear errors.

Credentials never come from the spec: a stage reads them from the environment
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optional `AWS_SESSION_TOKEN`; the Workflow
maps `storage.s3.secretRef` onto these with secretKeyRef), or from a mounted Secret folder
(`PSFT_S3_CREDENTIALS_DIR`, files named by `secretRef.accessKeyKey` / `secretKeyKey`).
Secret values are never logged or put into messages.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.util import Retry, Timeout

from psft.trainer.storage.base import MissingArtifact, StorageError
from psft.workflows.spec import S3Storage

log = logging.getLogger("psft.storage")

ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
SESSION_TOKEN_ENV = "AWS_SESSION_TOKEN"
CREDENTIALS_DIR_ENV = "PSFT_S3_CREDENTIALS_DIR"
DEFAULT_CREDENTIALS_DIR = "/var/run/secrets/psft/s3"

AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}
TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}

T = TypeVar("T")


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    source: str = "environment"


def load_credentials(s3: S3Storage) -> Credentials:
    """Keys from the environment, else from a mounted Secret folder; a clear error if none."""
    access, secret = os.environ.get(ACCESS_KEY_ENV), os.environ.get(SECRET_KEY_ENV)
    if access and secret:
        token = os.environ.get(SESSION_TOKEN_ENV) or None
        return Credentials(access, secret, token, f"${ACCESS_KEY_ENV}/${SECRET_KEY_ENV}")
    folder = Path(os.environ.get(CREDENTIALS_DIR_ENV, DEFAULT_CREDENTIALS_DIR))
    ref = s3.secret_ref
    names = (ref.access_key_key, ref.secret_key_key) if ref else ("accessKey", "secretKey")
    files = [folder / n for n in names]
    if all(f.is_file() for f in files):
        access, secret = (f.read_text().strip() for f in files)
        if access and secret:
            return Credentials(access, secret, None, f"files in {folder}")
    secret_hint = f" (the Secret {ref.name!r} of storage.s3.secretRef)" if ref else ""
    raise StorageError(
        f"no S3 credentials for {s3.endpoint}: set {ACCESS_KEY_ENV} and {SECRET_KEY_ENV}, or "
        f"mount the keys{secret_hint} as files {names[0]!r} and {names[1]!r} in "
        f"${CREDENTIALS_DIR_ENV} (default {DEFAULT_CREDENTIALS_DIR}); keys never go in the spec"
    )


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one S3 operation on 5xx, timeouts and connection resets."""

    attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 15.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter before retry number `attempt` (1-based)."""
        return min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)) * (
            0.5 + random.random() / 2
        )


def split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """`host:port` and TLS flag; an explicit http:// or https:// scheme wins."""
    if endpoint.startswith("https://"):
        return endpoint.removeprefix("https://").rstrip("/"), True
    if endpoint.startswith("http://"):
        return endpoint.removeprefix("http://").rstrip("/"), False
    return endpoint.rstrip("/"), secure


class S3Connection:
    """A minio client plus the rules every call follows: retry transient failures with
    backoff, then turn what is left into a `StorageError` that says what to fix."""

    def __init__(
        self,
        s3: S3Storage,
        credentials: Credentials | None = None,
        *,
        policy: RetryPolicy | None = None,
        max_connections: int = 32,
    ) -> None:
        self.settings = s3
        self.credentials = credentials or load_credentials(s3)
        self.policy = policy or RetryPolicy()
        self.endpoint, secure = split_endpoint(s3.endpoint, s3.secure)
        ca = s3.ca_bundle or os.environ.get("SSL_CERT_FILE") or certifi.where()
        if s3.ca_bundle and not Path(s3.ca_bundle).is_file():
            raise StorageError(f"storage.s3.caBundle: {s3.ca_bundle} is not a file")
        http = urllib3.PoolManager(
            timeout=Timeout(connect=self.policy.connect_timeout_s, read=self.policy.read_timeout_s),
            maxsize=max_connections,
            cert_reqs="CERT_REQUIRED",
            ca_certs=ca,
            # quick in-request retries; S3Connection.call adds the patient, logged ones
            retries=Retry(total=2, backoff_factor=0.1, status_forcelist=(500, 502, 503, 504)),
        )
        self.client = Minio(
            self.endpoint,
            access_key=self.credentials.access_key,
            secret_key=self.credentials.secret_key,
            session_token=self.credentials.session_token,
            secure=secure,
            region=s3.region,
            http_client=http,
        )

    def __repr__(self) -> str:
        return f"S3Connection({self.endpoint!r}, key from {self.credentials.source})"

    def call(self, what: str, fn: Callable[[], T], *, bucket: str | None = None) -> T:
        """Run one S3 operation with retries; `what` names it in messages."""
        attempts = max(self.policy.attempts, 1)
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except S3Error as exc:
                if exc.code not in TRANSIENT_CODES:
                    raise self.explain(exc, what, bucket) from None
                if attempt == attempts:
                    raise StorageError(
                        f"S3 at {self.endpoint} failed {what} after {attempts} tries "
                        f"({exc.code}: {exc.message}); the server is failing or overloaded, "
                        "try again later"
                    ) from None
                reason = f"{exc.code}"
            except InvalidResponseError as exc:
                status = getattr(exc, "_code", None) or 0
                if int(status) < 500 or attempt == attempts:
                    raise StorageError(
                        f"{self.endpoint} answered {what} with something that is not S3 "
                        f"(HTTP {status}); check storage.s3.endpoint"
                    ) from None
                reason = f"HTTP {status}"
            except (ServerError, urllib3.exceptions.HTTPError, OSError) as exc:
                tls = _tls_problem(exc)
                if tls:
                    raise StorageError(
                        f"TLS to S3 at {self.endpoint} failed during {what} ({tls}); "
                        + (
                            "the server does not speak TLS here: set storage.s3.secure: false"
                            if "WRONG_VERSION_NUMBER" in tls
                            else "for a private CA set storage.s3.caBundle to its certificate"
                        )
                    ) from None
                if attempt == attempts:
                    raise StorageError(
                        f"S3 at {self.endpoint} failed {what} after {attempts} tries "
                        f"({_short(exc)}); check that the server is up and storage.s3.endpoint "
                        "and storage.s3.secure are right"
                    ) from None
                reason = _short(exc)
            pause = self.policy.delay(attempt)
            log.warning(
                "S3 %s failed (%s); retry %d/%d in %.1fs",
                what,
                reason,
                attempt,
                attempts - 1,
                pause,
            )
            time.sleep(pause)
        raise AssertionError("unreachable")

    def explain(self, exc: S3Error, what: str, bucket: str | None) -> StorageError:
        """A message for the user from an S3 error response."""
        bucket = bucket or getattr(exc, "bucket_name", None) or self.settings.bucket
        if exc.code in AUTH_CODES or (exc.response is not None and exc.response.status == 403):
            return StorageError(
                f"S3 at {self.endpoint} refused {what} ({exc.code}, HTTP 403): the access key "
                f"is unknown, the secret key is wrong, or the key may not use bucket "
                f"{bucket!r}. Keys come from {self.credentials.source}."
            )
        if exc.code == "NoSuchBucket":
            return StorageError(
                f"bucket {bucket!r} does not exist at {self.endpoint}: create it, or set "
                "storage.s3.createBucket: true to let psft create it"
            )
        if exc.code in ("NoSuchKey", "NoSuchObject"):
            name = getattr(exc, "object_name", None) or ""
            return MissingArtifact(f"s3://{bucket}/{name} does not exist ({what})")
        return StorageError(f"S3 at {self.endpoint} failed {what}: {exc.code}: {exc.message}")

    def ensure_bucket(self, bucket: str, *, create: bool) -> None:
        """A clear error for a missing bucket, or create it when the spec allows."""
        if self.call(f"checking bucket {bucket!r}", lambda: self.client.bucket_exists(bucket)):
            return
        if not create:
            raise StorageError(
                f"bucket {bucket!r} does not exist at {self.endpoint}: create it, or set "
                "storage.s3.createBucket: true to let psft create it"
            )
        try:
            self.call(f"creating bucket {bucket!r}", lambda: self.client.make_bucket(bucket))
        except StorageError as exc:
            if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
                raise
        log.info("created bucket %s at %s", bucket, self.endpoint)


def _tls_problem(exc: BaseException) -> str | None:
    """The TLS error behind a failed request (not worth retrying), if that is what it was."""
    reason: BaseException | None = exc
    for _ in range(4):
        if reason is None:
            return None
        if isinstance(reason, ssl.SSLError | urllib3.exceptions.SSLError):
            return str(reason)[:200]
        reason = getattr(reason, "reason", None) or reason.__cause__ or reason.__context__
    return None


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", None) or exc)
    return f"{type(exc).__name__}: {text}"[:240]
