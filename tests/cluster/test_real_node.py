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
from servers.cluster import node as node_module
from servers.cluster.control_plane import ControlPlane
from servers.cluster.node import LOCK_FILE, RUN_ENV, RealNode

pytestmark = [pytest.mark.integration]

if sys.platform != "linux" or os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="mounts and other runs' processes need root"))

KILLED_RUN = "4242-deadbeef"


def _mounted_under(folder: Path) -> list[str]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [line.split()[1] for line in lines if line.split()[1].startswith(f"{folder}/")]


def _leave_a_killed_run(node_folder: Path) -> tuple[Path, list[subprocess.Popen]]:
    """What a run killed mid-way leaves: processes carrying its mark, a pod volume still
    mounted, containerd's store (the imported images), its logs."""
    store = node_folder / "containerd" / "root"
    store.mkdir(parents=True)
    (store / "blob").write_bytes(b"\0" * 4096)
    volume = node_folder / "kubelet" / "root" / "pods" / "uid" / "volumes" / "dshm"
    volume.mkdir(parents=True)
    (node_folder / "logs.txt").write_text("kept for the diagnosis")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "psft-test", str(volume)], check=True)
    env = {**os.environ, RUN_ENV: KILLED_RUN}
    servers = [subprocess.Popen(["sleep", "600"], cwd=node_folder.parent, env=env) for _ in "ab"]
    return store, servers


def _reap(node: RealNode, state: dict[str, str]) -> None:
    with open(LOCK_FILE, "w") as lock:  # as RealNode.start holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        node_module.STATE_FILE.write_text(json.dumps(state))
        node._reap_killed_run()


@pytest.fixture(autouse=True)
def own_state_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's state file names a real killed run, if any: not ours to touch."""
    monkeypatch.setattr(node_module, "STATE_FILE", tmp_path / "state.json")


@pytest.mark.parametrize("same_folder", [False, True], ids=["other-folder", "fixed-basetemp"])
def test_a_killed_runs_processes_mounts_and_stores_go_at_the_next_start(
    tmp_path: Path, same_folder: bool
) -> None:
    killed = tmp_path / "killed" / "plane" / "node"
    store, servers = _leave_a_killed_run(killed)
    # a developer's shell reading the killed run's logs: its folder, not its mark
    reader = subprocess.Popen(["sleep", "600"], cwd=killed)
    plane = killed.parent if same_folder else tmp_path / "next" / "plane"
    node = RealNode(ControlPlane(plane))
    try:
        _reap(node, {"node": str(killed), "run": KILLED_RUN})
        reaped = [p.wait(10) for p in servers]  # TimeoutExpired if one was missed
        alive = reader.poll() is None
    finally:
        for mount in sorted(_mounted_under(tmp_path), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        for proc in [reader, *servers]:
            proc.kill()
    assert reaped == [-9, -9]
    assert alive
    assert not _mounted_under(killed)
    assert not store.exists() and not (killed / "kubelet" / "root").exists()
    assert (killed / "logs.txt").read_text() == "kept for the diagnosis"
    assert not node_module.STATE_FILE.exists()


def test_nothing_is_reaped_without_a_state_file_or_for_this_run(tmp_path: Path) -> None:
    store = tmp_path / "other" / "plane" / "node" / "containerd" / "root"
    store.mkdir(parents=True)
    node = RealNode(ControlPlane(tmp_path / "next"))
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        node._reap_killed_run()  # no state file
    assert store.exists()
    # a node of this very run that did not stop: its processes are this run's own
    _reap(node, {"node": str(store.parents[1]), "run": os.environ[RUN_ENV]})
    assert store.exists()
