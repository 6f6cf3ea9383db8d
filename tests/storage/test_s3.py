"""S3RunStore and fetch_uri against a real S3 server (SeaweedFS with real auth)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from servers.jobs import make_job, make_stage_config
from servers.seaweed import SeaweedS3

from psft.trainer.storage import MissingArtifact, StorageError, fetch_uri, open_run_store
from psft.trainer.storage.s3 import S3RunStore
from psft.trainer.storage.s3client import RetryPolicy
from psft.trainer.storage.transfer import MiB, TransferSettings
from psft.workflows import layout

pytestmark = pytest.mark.integration

SMALL_PARTS = TransferSettings(part_size=5 * MiB, file_workers=3, part_workers=3)
RUN = "psft/default/demo/local"


def s3_config(server: SeaweedS3, bucket: str, tmp_path: Path, machine: str = "a", **s3: object):
    job = make_job(storage=server.storage_spec(bucket, **s3), psft={"keepCheckpoints": 2})
    return make_stage_config(job, work_dir=str(tmp_path / f"work-{machine}"))


def open_store(config, **kw) -> S3RunStore:
    store = S3RunStore.from_config(config, settings=SMALL_PARTS, **kw)
    assert isinstance(store, S3RunStore)
    return store


def write_checkpoint(store, step: int, big: int = 0) -> dict[str, str]:
    """Files of a checkpoint (`big` bytes in the weights file); returns rel path -> md5."""
    folder = store.checkpoint_dir("train", step)
    rng = os.urandom
    files = {
        "model.safetensors": rng(big or 1000 + step),
        "optimizer.pt": rng(3000),
        "rng/state-0.pt": rng(200),
        "trainer_state.json": json.dumps({"step": step}).encode(),
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return {rel: hashlib.md5(data).hexdigest() for rel, data in files.items()}


def tree_md5(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".psft")
    }


def object_names(server: SeaweedS3, bucket: str, prefix: str) -> list[str]:
    return sorted(
        o.object_name for o in server.client().list_objects(bucket, prefix=prefix, recursive=True)
    )


def test_open_run_store_picks_s3(s3_env, bucket, tmp_path: Path) -> None:
    store = open_run_store(s3_config(s3_env, bucket, tmp_path))
    assert isinstance(store, S3RunStore)
    assert store.root == f"s3://{bucket}/{RUN}"
    assert store.work_dir == (tmp_path / "work-a").resolve()


def test_checkpoint_folder_round_trip_and_prune(s3_env, bucket, tmp_path: Path) -> None:
    writer = open_store(s3_config(s3_env, bucket, tmp_path, "a"))
    assert writer.latest_checkpoint("train") is None
    expected = write_checkpoint(writer, 2, big=12 * MiB)  # 3 parts of 5 MiB, in parallel
    writer.commit_checkpoint("train", 2)

    names = object_names(s3_env, bucket, f"{RUN}/train/checkpoints/")
    assert f"{RUN}/train/checkpoints/latest" in names
    assert f"{RUN}/train/checkpoints/step-2/.psft-manifest.json" in names
    assert f"{RUN}/train/checkpoints/step-2/rng/state-0.pt" in names
    etag = s3_env.client().stat_object(bucket, f"{RUN}/train/checkpoints/step-2/model.safetensors")
    assert etag.etag.strip('"').endswith("-3")  # multipart

    # another machine: empty work dir, trusts the marker, downloads the folder
    reader = open_store(s3_config(s3_env, bucket, tmp_path, "b"))
    assert reader.latest_checkpoint("train") == 2
    folder = reader.pull(layout.checkpoint("train", 2))
    assert tree_md5(folder) == expected

    for step in (4, 6):
        write_checkpoint(writer, step)
        writer.commit_checkpoint("train", step)
    steps = {n.split("/")[6] for n in object_names(s3_env, bucket, f"{RUN}/train/checkpoints/")}
    assert steps == {"latest", "step-4", "step-6"}
    assert reader.latest_checkpoint("train") == 6
    local = sorted(p.name for p in writer.local_path("train/checkpoints").iterdir() if p.is_dir())
    assert local == ["step-4", "step-6"]


def test_verl_checkpoints_are_pruned_in_the_bucket_as_on_disk(s3_env, bucket, tmp_path) -> None:
    """verl prunes its step folders on the node's disk only; the one-node launcher pushes
    the whole checkpoints folder after each save, so the bucket kept every step. prune_store
    removes the same folders there, and the pushed folder still pulls whole elsewhere."""
    import shutil

    from psft.trainer.verl.checkpoints import TRACKER, prune_store

    key = "train/verl/checkpoints"
    writer = open_store(s3_config(s3_env, bucket, tmp_path, "a"))
    local = writer.local_path(key)
    for step in (2, 4, 6):
        (local / f"global_step_{step}").mkdir(parents=True)
        (local / f"global_step_{step}" / "model_world_size_1_rank_0.pt").write_bytes(b"w" * step)
        (local / TRACKER).write_text(str(step))
        if step == 6:  # verl's own pruning (keep 2) of the node's disk
            shutil.rmtree(local / "global_step_2")
        writer.push(key)
        removed = prune_store(writer, key, step, keep=2)
        assert removed == ([2] if step == 6 else [])
    prefix = f"{RUN}/{key}/"
    names = object_names(s3_env, bucket, prefix)
    assert {n[len(prefix) :].split("/")[0] for n in names} == {
        "global_step_4", "global_step_6", TRACKER, ".psft-manifest.json"
    }  # fmt: skip
    assert prune_store(writer, key, 6, keep=None) == []  # verl's "keep all"
    reader = open_store(s3_config(s3_env, bucket, tmp_path, "b"))
    pulled = reader.pull(key)
    assert sorted(p.name for p in pulled.iterdir()) == ["global_step_4", "global_step_6", TRACKER]


def test_files_push_pull_exists_and_missing_keys(s3_env, bucket, tmp_path: Path) -> None:
    writer = open_store(s3_config(s3_env, bucket, tmp_path, "a"))
    path = writer.local_path(layout.metrics("train"))
    path.parent.mkdir(parents=True)
    path.write_text('{"step": 1}\n')
    writer.push(layout.metrics("train"))
    reader = open_store(s3_config(s3_env, bucket, tmp_path, "b"))
    assert reader.exists(layout.metrics("train"))
    assert reader.exists("train")  # a folder
    assert not reader.exists(layout.final_model("train"))
    assert reader.pull(layout.metrics("train")).read_text() == '{"step": 1}\n'
    with pytest.raises(MissingArtifact, match="train/final is missing from the run at s3://"):
        reader.pull(layout.final_model("train"))
    with pytest.raises(MissingArtifact, match="cannot publish"):
        writer.push("eval/summary.json")
    # a newer version of the object replaces the cached copy
    path.write_text('{"step": 1}\n{"step": 2}\n')
    writer.push(layout.metrics("train"))
    assert reader.pull(layout.metrics("train")).read_text().count("\n") == 2


CRASH_BETWEEN_FILES_AND_MARKER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from psft.trainer.storage import open_run_store
    from psft.workflows.stages import read_stage_config

    store = open_run_store(read_stage_config(sys.argv[1]))
    folder = store.checkpoint_dir("train", 4)
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "trainer_state.json").write_text('{"step": 4}')
    real_write = store.transfer.write_bytes

    def write_bytes(name, data, *args, **kwargs):
        if name.endswith("/checkpoints/latest"):
            os.kill(os.getpid(), signal.SIGKILL)  # dies after the files, before the marker
        return real_write(name, data, *args, **kwargs)

    store.transfer.write_bytes = write_bytes
    store.commit_checkpoint("train", 4)
    """
)


def test_crash_between_files_and_marker_keeps_the_old_checkpoint(
    s3_env, bucket, tmp_path: Path
) -> None:
    config = s3_config(s3_env, bucket, tmp_path, "a")
    store = open_store(config)
    expected = write_checkpoint(store, 2)
    store.commit_checkpoint("train", 2)
    stage_json = tmp_path / "stage.json"
    stage_json.write_text(config.dump())
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_BETWEEN_FILES_AND_MARKER, str(stage_json)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    names = object_names(s3_env, bucket, f"{RUN}/train/checkpoints/step-4/")
    assert f"{RUN}/train/checkpoints/step-4/model.safetensors" in names  # files did land

    fresh = open_store(s3_config(s3_env, bucket, tmp_path, "b"))
    assert fresh.latest_checkpoint("train") == 2  # only the marker counts
    assert tree_md5(fresh.pull(layout.checkpoint("train", 2))) == expected
    # the rerun saves step 4 again and commits it
    write_checkpoint(fresh, 4)
    fresh.commit_checkpoint("train", 4)
    assert store.latest_checkpoint("train") == 4


def test_bad_credentials_are_a_clear_403(seaweed, bucket, tmp_path, monkeypatch) -> None:
    config = s3_config(seaweed, bucket, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0000")
    with pytest.raises(StorageError) as wrong_secret:
        open_run_store(config)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    with pytest.raises(StorageError) as unknown_key:
        open_run_store(config)
    for exc in (wrong_secret, unknown_key):
        msg = str(exc.value)
        assert "refused" in msg and "HTTP 403" in msg and "AWS_ACCESS_KEY_ID" in msg
        assert "not-the-secret" not in msg
    # a HEAD answer has no body, so S3 names no finer reason than AccessDenied there


def test_no_credentials_says_where_they_come_from(seaweed, bucket, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.setenv("PSFT_S3_CREDENTIALS_DIR", str(tmp_path / "secret"))
    config = s3_config(seaweed, bucket, tmp_path, secretRef={"name": "minio-creds"})
    with pytest.raises(StorageError, match=r"no S3 credentials.*'minio-creds'"):
        open_run_store(config)
    # a mounted Secret folder works
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "accessKey").write_text(seaweed.access_key + "\n")
    (tmp_path / "secret" / "secretKey").write_text(seaweed.secret_key)
    store = open_run_store(config)
    assert store.latest_checkpoint("train") is None
    assert seaweed.secret_key not in repr(store) + repr(store.conn)


def test_missing_bucket_is_an_error_unless_create_bucket(s3_env, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"bucket 'psft-absent' does not exist.*createBucket"):
        open_run_store(s3_config(s3_env, "psft-absent", tmp_path))
    store = open_run_store(s3_config(s3_env, "psft-created", tmp_path, createBucket=True))
    assert s3_env.client().bucket_exists("psft-created")
    assert store.latest_checkpoint("train") is None


def test_server_stopped_mid_upload(own_seaweed: SeaweedS3, tmp_path, monkeypatch) -> None:
    for name, value in own_seaweed.env().items():
        monkeypatch.setenv(name, value)
    bucket = own_seaweed.create_bucket("psft-outage")
    config = s3_config(own_seaweed, bucket, tmp_path)
    quick = RetryPolicy(attempts=3, base_delay_s=0.2, connect_timeout_s=2, read_timeout_s=5)
    store = open_store(config, policy=quick)
    expected = write_checkpoint(store, 1)
    store.commit_checkpoint("train", 1)

    # 1) the server dies while step 2 uploads and stays down: retried, then a clear error
    write_checkpoint(store, 2, big=40 * MiB)
    prefix = f"{RUN}/train/checkpoints/step-2/"
    probe = own_seaweed.client()

    def kill_when_uploading() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            uploads = list(probe._list_multipart_uploads(bucket, prefix=prefix).uploads)
            if uploads or list(probe.list_objects(bucket, prefix=prefix, recursive=True)):
                own_seaweed.stop(kill=True)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_when_uploading)
    killer.start()
    with pytest.raises(StorageError, match=r"failed .* after 3 tries.*server is up"):
        store.commit_checkpoint("train", 2)
    killer.join()
    assert own_seaweed.proc is None  # it really was stopped mid-upload

    own_seaweed.start()
    reader = open_store(s3_config(own_seaweed, bucket, tmp_path, "b"))
    assert reader.latest_checkpoint("train") == 1  # nothing half-visible
    names = object_names(own_seaweed, bucket, prefix)
    assert f"{prefix}.psft-manifest.json" not in names
    assert tree_md5(reader.pull(layout.checkpoint("train", 1))) == expected

    # 2) a short outage: the retries ride it out and the commit succeeds
    patient = RetryPolicy(attempts=8, base_delay_s=0.5, connect_timeout_s=2, read_timeout_s=10)
    store = open_store(config, policy=patient)
    expected = write_checkpoint(store, 2)
    own_seaweed.stop(kill=True)
    restarter = threading.Timer(1.0, own_seaweed.start)
    restarter.start()
    store.commit_checkpoint("train", 2)
    restarter.join()
    assert reader.latest_checkpoint("train") == 2
    assert tree_md5(reader.pull(layout.checkpoint("train", 2))) == expected


def test_fetch_uri_downloads_once_and_verifies(s3_env, bucket, tmp_path: Path) -> None:
    client = s3_env.client()
    weights = os.urandom(7 * MiB)
    for name, data in {
        "models/tiny/config.json": b'{"a": 1}',
        "models/tiny/model.safetensors": weights,
        "data/train.jsonl": b'{"prompt": "1+1", "demonstration": "2"}\n',
    }.items():
        client.put_object(bucket, name, io.BytesIO(data), len(data))
    config = s3_config(s3_env, bucket, tmp_path)
    cache = tmp_path / "inputs"

    model = fetch_uri(f"s3://{bucket}/models/tiny", cache, config=config)
    assert (model / "model.safetensors").read_bytes() == weights
    assert json.loads((model / "config.json").read_text()) == {"a": 1}
    stamp = (model / "model.safetensors").stat().st_mtime_ns
    assert fetch_uri(f"s3://{bucket}/models/tiny", cache, config=config) == model
    assert (model / "model.safetensors").stat().st_mtime_ns == stamp  # not downloaded again

    data = fetch_uri(f"s3://{bucket}/data/train.jsonl", cache, config=config)
    assert data.read_text().startswith('{"prompt"')
    data.write_text("damaged")  # a cache file of the wrong size is fetched again
    data = fetch_uri(f"s3://{bucket}/data/train.jsonl", cache, config=config)
    assert data.read_text().startswith('{"prompt"')
    client.put_object(bucket, "data/train.jsonl", io.BytesIO(b"v2 same sz"), 10)
    assert fetch_uri(f"s3://{bucket}/data/train.jsonl", cache, config=config).read_text() == (
        "v2 same sz"
    )

    with pytest.raises(MissingArtifact, match="does not exist"):
        fetch_uri(f"s3://{bucket}/models/absent", cache, config=config)


def test_metrics_jsonl_is_published_with_checkpoints_and_at_the_end(
    s3_env, bucket, tmp_path: Path, monkeypatch, caplog
) -> None:
    from psft.trainer.telemetry import Telemetry

    monkeypatch.setenv("PSFT_METRICS_ADDR", "127.0.0.1")
    job = make_job(storage=s3_env.storage_spec(bucket), psft={"saveEvery": 2})
    config = make_stage_config(job, work_dir=str(tmp_path / "pod-0"), metrics_port=0)
    store = open_store(config)
    name = f"{RUN}/{layout.metrics('train')}"

    def published() -> list[int]:
        try:
            resp = s3_env.client().get_object(bucket, name)
        except Exception:
            return []
        try:
            return [json.loads(x)["step"] for x in resp.read().decode().splitlines()]
        finally:
            resp.close()
            resp.release_conn()

    with Telemetry(config, store.local_path(layout.metrics("train")), store=store) as tm:
        tm.log({"step": 1, "total_steps": 5, "loss": 1.0})
        assert published() == []
        tm.log({"step": 2, "total_steps": 5, "loss": 0.9})  # a checkpoint step
        assert published() == [1, 2]
        tm.log({"step": 3, "total_steps": 5, "loss": 0.8})
        assert published() == [1, 2]
    assert published() == [1, 2, 3]  # on close

    # a new pod resuming from checkpoint 2 continues the published record
    config_b = config.model_copy(update={"work_dir": str(tmp_path / "pod-1")})
    store_b = open_store(config_b)
    path_b = store_b.local_path(layout.metrics("train"))
    with Telemetry(config_b, path_b, store=store_b) as tm:
        tm.rewind(2)
        tm.log({"step": 3, "total_steps": 5, "loss": 0.7})
    assert published() == [1, 2, 3]
    assert [json.loads(x)["loss"] for x in path_b.read_text().splitlines()] == [1.0, 0.9, 0.7]
    # a resume point past the published record is reported, not hidden
    with caplog.at_level("WARNING"), Telemetry(config_b, path_b, store=store_b) as tm:
        tm.rewind(6)
    assert "no records for steps 4-6" in caplog.text


def test_tls_with_a_private_ca_bundle(tmp_path: Path, monkeypatch) -> None:
    server = SeaweedS3(tmp_path / "seaweed-tls", tls=True).start()
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        bucket = server.create_bucket("psft-tls")
        store = open_store(s3_config(server, bucket, tmp_path))  # secure, caBundle
        expected = write_checkpoint(store, 1)
        store.commit_checkpoint("train", 1)
        reader = open_store(s3_config(server, bucket, tmp_path, "b"))
        assert tree_md5(reader.pull(layout.checkpoint("train", reader.latest_checkpoint("train"))))
        assert tree_md5(reader.local_path(layout.checkpoint("train", 1))) == expected

        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        untrusted = s3_config(server, bucket, tmp_path, caBundle=None)
        with pytest.raises(StorageError, match=r"TLS .* failed.*storage\.s3\.caBundle"):
            open_run_store(untrusted)
        with pytest.raises(StorageError, match=r"caBundle: .* is not a file"):
            open_run_store(s3_config(server, bucket, tmp_path, caBundle=str(tmp_path / "nope")))
    finally:
        server.stop(kill=True)


def test_tls_against_a_plain_http_server_says_so(s3_env, bucket, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"does not speak TLS.*secure: false"):
        open_run_store(s3_config(s3_env, bucket, tmp_path, secure=True))


def test_folder_changed_behind_the_manifest_is_refused(s3_env, bucket, tmp_path: Path) -> None:
    writer = open_store(s3_config(s3_env, bucket, tmp_path, "a"))
    final = writer.local_path(layout.final_model("train"))
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(os.urandom(2048))
    writer.push(layout.final_model("train"))
    name = f"{RUN}/train/final/model.safetensors"
    s3_env.client().put_object(bucket, name, io.BytesIO(b"other"), 5)
    reader = open_store(s3_config(s3_env, bucket, tmp_path, "b"))
    with pytest.raises(StorageError, match="differs from the folder's manifest"):
        reader.pull(layout.final_model("train"))
    writer.push(layout.final_model("train"))  # pushing again repairs it
    assert tree_md5(reader.pull(layout.final_model("train"))) == tree_md5(final)


def test_5xx_resets_and_timeouts_are_retried(seaweed, bucket, tmp_path, monkeypatch) -> None:
    from servers.faulty_proxy import FaultyProxy

    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    proxy = FaultyProxy(seaweed.endpoint, stall_s=2.0).start()
    try:
        s3 = {"endpoint": proxy.endpoint, "bucket": bucket, "secure": False}
        job = make_job(storage={"type": "s3", "s3": s3})
        config = make_stage_config(job, work_dir=str(tmp_path / "work"))
        # each fault fails one try of an operation (also those urllib3 retries itself)
        policy = RetryPolicy(attempts=8, base_delay_s=0.05, max_delay_s=0.2, read_timeout_s=1.0)
        store = open_store(config, policy=policy)
        expected = write_checkpoint(store, 1, big=11 * MiB)  # 3 parts
        proxy.inject("503", "reset", "500", "stall", "503", "reset")
        store.commit_checkpoint("train", 1)
        assert proxy.served == ["503", "reset", "500", "stall", "503", "reset"]
        assert store.latest_checkpoint("train") == 1

        other_pod = config.model_copy(update={"work_dir": str(tmp_path / "b")})
        reader = open_store(other_pod, policy=policy)
        proxy.inject("reset", "503", "stall")
        assert tree_md5(reader.pull(layout.checkpoint("train", 1))) == expected

        # a server that keeps failing: a clear error after the retries, old marker kept
        write_checkpoint(store, 2)
        proxy.inject(*["503"] * 100)
        with pytest.raises(StorageError, match=r"failed .* after 8 tries"):
            store.commit_checkpoint("train", 2)
        proxy.faults.clear()
        assert reader.latest_checkpoint("train") == 1
    finally:
        proxy.stop()
