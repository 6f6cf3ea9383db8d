"""The real node's clean-up of a run killed before its stop() (servers/cluster/node.py).

A CI run once started with 21 GB of an earlier, killed run still on disk: its containerd
store pinned by mounts nothing unmounted, which pytest cannot delete. The kubelet of the
next run then evicted the SmolLM2 train pod three times for lack of disk.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from servers.cluster.control_plane import ControlPlane
from servers.cluster.node import LOCK_FILE, STATE_FILE, RealNode

pytestmark = [pytest.mark.integration]

if sys.platform != "linux" or os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="mounts and other runs' processes need root"))


def _mounted_under(folder: Path) -> list[str]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [line.split()[1] for line in lines if line.split()[1].startswith(f"{folder}/")]


def test_a_killed_runs_processes_mounts_and_stores_go_at_the_next_start(tmp_path: Path) -> None:
    # what a run killed mid-way leaves: its plane's and its S3 server's processes, a pod
    # volume still mounted, containerd's store (the imported images), the state file
    run = tmp_path / "killed"
    stale_plane = run / "plane"
    stale = stale_plane / "node"
    store = stale / "containerd" / "root"
    store.mkdir(parents=True)
    (store / "blob").write_bytes(b"\0" * 4096)
    volume = stale / "kubelet" / "root" / "pods" / "uid" / "volumes" / "dshm"
    volume.mkdir(parents=True)
    (stale / "logs.txt").write_text("kept for the diagnosis")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "psft-test", str(volume)], check=True)
    (run / "s3").mkdir()
    leftovers = [subprocess.Popen(["sleep", "600"], cwd=cwd) for cwd in (stale_plane, run / "s3")]
    bystander = subprocess.Popen(["sleep", "600"], cwd=tmp_path)
    node = RealNode(ControlPlane(tmp_path / "next"))
    with open(LOCK_FILE, "w") as lock:  # as RealNode.start holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        STATE_FILE.write_text(json.dumps({"node": str(stale), "run": str(run)}))
        try:
            node._reap_killed_run()
            alive = bystander.poll() is None  # another folder's process
            reaped = [p.wait(10) for p in leftovers]  # TimeoutExpired if one was missed
        finally:
            for mount in sorted(_mounted_under(tmp_path), key=len, reverse=True):
                subprocess.run(["umount", "-l", mount], check=False)
            for proc in [bystander, *leftovers]:
                proc.kill()
    assert alive
    assert reaped == [-9, -9]
    assert not _mounted_under(stale)
    assert not store.exists() and not (stale / "kubelet" / "root").exists()
    assert (stale / "logs.txt").read_text() == "kept for the diagnosis"
    assert not STATE_FILE.exists()


def test_a_node_that_stopped_cleanly_leaves_nothing_to_reap(tmp_path: Path) -> None:
    """No state file: nothing of anyone else's is touched."""
    store = tmp_path / "other" / "plane" / "node" / "containerd" / "root"
    store.mkdir(parents=True)
    node = RealNode(ControlPlane(tmp_path / "next"))
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        STATE_FILE.unlink(missing_ok=True)
        node._reap_killed_run()
    assert store.exists()
