"""Artifact deletion touches only the job's own S3 prefix."""

from __future__ import annotations

import logging

import kopf
import pytest

from psft.operator.cleanup import delete_artifacts, job_prefix
from psft.workflows.validate import validate_job


def _job(uid: str | None, prefix: str = "psft") -> dict:
    meta = {"name": "wiped", "namespace": "ml"} | ({"uid": uid} if uid else {})
    storage = {
        "type": "s3",
        "deleteOnJobDeletion": True,
        "s3": {
            "endpoint": "s3.example:9000",
            "bucket": "runs",
            "prefix": prefix,
            "secretRef": {"name": "keys"},
        },
    }
    return {
        "metadata": meta,
        "spec": {
            "model": {"source": "m"},
            "dataset": {"train": ["s3://runs/d.jsonl"]},
            "storage": storage,
        },
    }


@pytest.mark.parametrize("prefix", ["psft", "", "/team/a/"])
def test_the_prefix_ends_in_the_jobs_uid(prefix: str) -> None:
    got = job_prefix(validate_job(_job("0c1d-uid", prefix)))
    assert got.split("/")[-4:] == ["ml", "wiped", "0c1d-uid", ""] and not got.startswith("/")


def test_a_job_without_uid_deletes_nothing() -> None:
    with pytest.raises(kopf.PermanentError, match="uid"):
        delete_artifacts(validate_job(_job(None)), logging.getLogger("t"))
