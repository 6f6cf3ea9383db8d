"""A real stage (`psft prepare`) with S3 storage and s3:// inputs, run as a process with
its keys in the environment: the outputs land in the bucket, and the secret key appears
in nothing the run produced (stage config, logs, cache, objects, Workflow manifest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from servers.jobs import make_job, make_stage_config
from servers.seaweed import SeaweedS3

from psft.workflows import layout

pytestmark = pytest.mark.integration

RUN = "psft/default/leak-check/local"


def upload_tree(server: SeaweedS3, bucket: str, folder: Path, prefix: str) -> None:
    client = server.client()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            client.fput_object(bucket, f"{prefix}/{p.relative_to(folder).as_posix()}", str(p))


def psft(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "psft.workflows.cli", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def grep_tree(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_prepare_stage_on_s3_never_leaks_the_secret(
    seaweed: SeaweedS3, bucket: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = [{"prompt": f"What is {i} + {i}?", "demonstration": f"It is {2 * i}."} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    upload_tree(seaweed, bucket, tiny_model_dir, "inputs/tiny-model")
    seaweed.client().fput_object(bucket, "inputs/train.jsonl", str(data))

    storage = seaweed.storage_spec(bucket, secretRef={"name": "psft-s3"})
    job = make_job(
        "leak-check",
        storage=storage,
        model={"source": f"s3://{bucket}/inputs/tiny-model"},
        dataset={"train": [f"s3://{bucket}/inputs/train.jsonl"], "systemPrompt": ""},
        psft={"batchSize": 2, "miniBatchSize": 1, "microBatchSize": 1},
        resources={"device": "cpu"},
    )
    config = make_stage_config(job, "prepare", work_dir=str(tmp_path / "work"))
    stage_json = tmp_path / "stage.json"
    stage_json.write_text(config.dump())
    env = {
        **os.environ,
        **seaweed.env(),
        "PSFT_CACHE_DIR": str(tmp_path / "cache"),
        "PSFT_CACHE": str(tmp_path / "model-cache"),
    }

    done = psft(["prepare", "--config", str(stage_json)], env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    names = {o.object_name for o in seaweed.client().list_objects(bucket, recursive=True)}
    for key in (layout.DATA_TRAIN, layout.DATA_VALIDATION, layout.DATA_STATS):
        assert f"{RUN}/{key}" in names
    assert (tmp_path / "cache" / "s3").is_dir()  # inputs came through fetch_uri's cache

    # a second run with a wrong secret: a clear message, no stack trace
    bad = psft(
        ["prepare", "--config", str(stage_json)],
        {**env, "AWS_SECRET_ACCESS_KEY": "wrong-" + seaweed.secret_key[::-1]},
        tmp_path,
    )
    assert bad.returncode == 2
    assert "refused" in bad.stderr and "HTTP 403" in bad.stderr
    assert "Traceback" not in bad.stderr

    secret = seaweed.secret_key.encode()
    outputs = done.stdout + done.stderr + bad.stdout + bad.stderr
    assert seaweed.secret_key not in outputs
    assert seaweed.secret_key[::-1] not in bad.stderr
    assert grep_tree(tmp_path, secret) == []  # stage.json, work dir, caches, logs
    client = seaweed.client()
    for name in sorted(names):
        resp = client.get_object(bucket, name)
        try:
            assert secret not in resp.read(), name
        finally:
            resp.close()
            resp.release_conn()
    try:
        from psft.workflows.argo import render_workflow
    except ImportError:  # the Workflow renderer is another area's; checked when present
        return
    manifest = json.dumps(render_workflow(job))
    assert seaweed.secret_key not in manifest
    assert "psft-s3" in manifest  # the Secret is referenced by name only
