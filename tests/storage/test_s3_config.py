"""Pure parts of the S3 layer: URIs, endpoints, credentials, backoff (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from psft.trainer.storage import StorageError
from psft.trainer.storage.s3 import parse_s3_uri
from psft.trainer.storage.s3client import RetryPolicy, load_credentials, split_endpoint
from psft.trainer.telemetry import _ranges
from psft.workflows.spec import S3Storage


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(StorageError, match="no bucket"):
        parse_s3_uri("s3:///key")
    with pytest.raises(StorageError, match="not an s3:// URI"):
        parse_s3_uri("/local/path")


def test_split_endpoint() -> None:
    assert split_endpoint("minio:9000", True) == ("minio:9000", True)
    assert split_endpoint("http://minio:9000/", True) == ("minio:9000", False)
    assert split_endpoint("https://s3.amazonaws.com", False) == ("s3.amazonaws.com", True)


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=4.0)
    delays = [policy.delay(a) for a in range(1, 8)]
    assert 0.5 <= delays[0] <= 1.0
    assert all(0.5 * min(4.0, 2 ** (a - 1)) <= d <= 4.0 for a, d in enumerate(delays, 1))


def test_credentials_from_env_then_mounted_files(monkeypatch, tmp_path: Path) -> None:
    s3 = S3Storage(endpoint="minio:9000", bucket="runs", secretRef={"name": "creds"})
    monkeypatch.setenv("PSFT_S3_CREDENTIALS_DIR", str(tmp_path))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK-secret")
    creds = load_credentials(s3)
    assert (creds.access_key, creds.secret_key) == ("AK", "SK-secret")
    assert "SK-secret" not in repr(creds)

    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    (tmp_path / "accessKey").write_text("AK2\n")
    (tmp_path / "secretKey").write_text("SK2\n")
    creds = load_credentials(s3)
    assert (creds.access_key, creds.secret_key) == ("AK2", "SK2")
    assert str(tmp_path) in creds.source

    custom = S3Storage(
        endpoint="minio:9000",
        bucket="runs",
        secretRef={"name": "creds", "accessKeyKey": "id", "secretKeyKey": "key"},
    )
    with pytest.raises(StorageError, match=r"'id' and 'key'"):
        load_credentials(custom)


def test_step_ranges_for_messages() -> None:
    assert _ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"
    assert _ranges([4]) == "4"
