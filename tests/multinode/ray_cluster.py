"""A real two-node Ray cluster on this machine: a head and a worker node started with
`ray start --block`, each in its own process group (so one node can be killed alone), one
CPU each and a custom resource naming the node, bound to 127.0.0.1, in a temp folder.

Used by tests/multinode and benchmarks/multinode.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
HEAD_RESOURCE = "psft_test_head"
WORKER_RESOURCE = "psft_test_worker"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRayCluster:
    def __init__(
        self, base: Path, cpus_per_node: int = 1, env: dict[str, str] | None = None
    ) -> None:
        self.base = base
        self.cpus = cpus_per_node
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's socket paths must stay short (AF_UNIX, 107 bytes)
        self.temp_dir = (
            Path(os.environ.get("TMPDIR", "/tmp")) / f"psft-ray-{os.getpid()}-{self.port}"
        )
        self.head: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        }
        self.env.pop("RAY_ADDRESS", None)

    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.base / log, "ab")  # noqa: SIM115 (lives as long as the node)
        return subprocess.Popen(
            [
                RAY,
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={self.cpus}",
                "--num-gpus=0",
                "--object-store-memory=100000000",
                "--disable-usage-stats",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )

    def start(self, timeout: float = 90) -> LocalRayCluster:
        self.base.mkdir(parents=True, exist_ok=True)
        self.head = self._start(
            [
                "--head",
                f"--port={self.port}",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=false",
                f"--resources={json.dumps({HEAD_RESOURCE: 1})}",
            ],
            "head.log",
        )
        self._wait_nodes(1, timeout)
        self.start_worker(timeout)
        return self

    def start_worker(self, timeout: float = 90) -> None:
        self.worker = self._start(
            [f"--address={self.address}", f"--resources={json.dumps({WORKER_RESOURCE: 1})}"],
            "worker.log",
        )
        self._wait_nodes(2, timeout)

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes (NodeID, Resources), read by a separate process."""
        code = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR');"
            "print(json.dumps([{'NodeID': n['NodeID'], 'Resources': n['Resources']}"
            " for n in ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            return []
        return json.loads(out.stdout.strip().splitlines()[-1])

    def node_id(self, resource: str) -> str:
        return next(n["NodeID"] for n in self.alive_nodes() if resource in n["Resources"])

    def _wait_nodes(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc, log in ((self.head, "head.log"), (self.worker, "worker.log")):
                if proc is not None and proc.poll() is not None:
                    text = (self.base / log).read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"ray start exited ({proc.returncode}): {text}")
            if len(self.alive_nodes()) >= n:
                return
            time.sleep(1.0)
        raise TimeoutError(f"the Ray cluster did not reach {n} nodes in {timeout:.0f} s")

    @staticmethod
    def _session(sid: int) -> list[int]:
        """Processes of session `sid`: a node's `ray start`, raylet, agents and the Ray
        workers it started (those have process groups of their own, not sessions)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # fields after the name: state, ppid, pgrp, session
                pids.append(int(stat.parent.name))
        return pids

    @classmethod
    def _kill(cls, proc: subprocess.Popen | None) -> None:
        if proc is None:
            return
        for pid in cls._session(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def kill_worker_node(self) -> None:
        """SIGKILL every process of the worker node (raylet and the workers it started)."""
        self._kill(self.worker)
        self.worker = None

    def stop(self) -> None:
        self._kill(self.worker)
        self._kill(self.head)
