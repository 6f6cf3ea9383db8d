"""Fixtures of the storage tests: a real SeaweedFS S3 server (see tests/servers)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers.seaweed import SeaweedS3

_buckets = itertools.count()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One S3 server for the session (tests use their own buckets)."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture
def bucket(seaweed: SeaweedS3) -> str:
    return seaweed.create_bucket(f"psft-test-{next(_buckets)}")


@pytest.fixture
def s3_env(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SeaweedS3:
    """Keys in the environment (as a pod gets them) and a private cache folder."""
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PSFT_CACHE_DIR", str(tmp_path / "cache"))
    return seaweed


@pytest.fixture
def own_seaweed(tmp_path: Path) -> Iterator[SeaweedS3]:
    """A server of the test's own, for tests that stop it."""
    server = SeaweedS3(tmp_path / "seaweed-own").start()
    yield server
    server.stop(kill=True)
