"""Artifact deletion for jobs with spec.storage.deleteOnJobDeletion (runs under a finalizer)."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from psft.operator import kube
from psft.workflows import layout
from psft.workflows.spec import PSFTJob


def job_prefix(job: PSFTJob) -> str:
    """The S3 key prefix only this job writes under: `<prefix>/<namespace>/<name>/<uid>/`."""
    s3 = job.spec.storage.s3
    assert s3 is not None
    return layout.run_root(job).removeprefix(f"s3://{s3.bucket}/").rstrip("/") + "/"


def delete_artifacts(job: PSFTJob, logger: logging.Logger | Any) -> int:
    """Delete every object under the job's S3 run root; returns how many were deleted.

    Local storage lives on the stage pods' volumes, which go with the Workflow: nothing to do.
    """
    storage = job.spec.storage
    if storage.type != "s3" or storage.s3 is None:
        logger.info("storage is not S3: no artifacts to delete from the operator")
        return 0
    s3 = storage.s3
    if not job.metadata.uid:
        # the run root ends in the job's uid; without it the prefix is not this job's own
        raise kopf.PermanentError("the job has no metadata.uid: refusing to delete artifacts")
    if s3.secret_ref is None:
        raise kopf.PermanentError(
            "spec.storage.s3.secretRef is required to delete artifacts (deleteOnJobDeletion)"
        )
    with kube.retry_on_api_error(f"reading Secret {s3.secret_ref.name}"):
        secret = kube.read_secret(job.metadata.namespace, s3.secret_ref.name)
    try:
        access, key = secret[s3.secret_ref.access_key_key], secret[s3.secret_ref.secret_key_key]
    except KeyError as exc:
        raise kopf.PermanentError(
            f"Secret {s3.secret_ref.name} has no key {exc.args[0]!r} (spec.storage.s3.secretRef)"
        ) from None

    from minio import Minio
    from minio.deleteobjects import DeleteObject

    client = Minio(
        s3.endpoint, access_key=access, secret_key=key, secure=s3.secure, region=s3.region
    )
    prefix = job_prefix(job)
    try:
        listing = client.list_objects(s3.bucket, prefix=prefix, recursive=True)
        names = [o.object_name for o in listing]
        errors = list(client.remove_objects(s3.bucket, (DeleteObject(n) for n in names)))
    except Exception as exc:  # network or S3 errors: retry later, the finalizer holds the job
        raise kopf.TemporaryError(f"deleting s3://{s3.bucket}/{prefix}: {exc}", delay=30) from None
    if errors:
        message = f"{len(errors)} objects could not be deleted: {errors[0]}"
        raise kopf.TemporaryError(message, delay=30)
    logger.info(f"deleted {len(names)} artifacts under s3://{s3.bucket}/{prefix}")
    return len(names)
