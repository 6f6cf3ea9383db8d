"""A real single-node Kubernetes control plane on 127.0.0.1, for tests.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built by build.py from
the versions in versions.toml), then on request kwok (fake GPU nodes whose pods run and exit
on demand), the Argo Workflows controller and the KubeRay operator. Every process binds to
127.0.0.1 on a free port, logs to `<folder>/logs/<name>.log`, and is stopped by PID.

Identities are static tokens: `admin` (system:masters) for the test itself and the
infrastructure controllers, the scheduler as `system:kube-scheduler` (its bootstrap role).
The operator under test authenticates with a ServiceAccount token, so the chart's RBAC is
what authorises it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from servers.cluster.build import ensure_built, load_components
from servers.cluster.pki import make_pki
from servers.seaweed import free_ports

SERVICE_CIDR = "10.96.0.0/24"
SERVICE_IP = "10.96.0.1"
KWOK_NODE_LABEL = "psft.test/kwok"
EXIT_CODE_ANNOTATION = "psft.test/exit-code"
EXIT_MESSAGE_ANNOTATION = "psft.test/exit-message"


class ClusterError(RuntimeError):
    """A component did not start; the message names it and quotes the end of its log."""


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, n: int = 40) -> str:
        with suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, timeout: float = 15) -> None:
        if self.popen.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


@dataclass
class ControlPlane:
    folder: Path
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    processes: dict[str, Process] = field(default_factory=dict)
    port: int = 0

    def __post_init__(self) -> None:
        self.components = load_components()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "logs").mkdir(exist_ok=True)

    # ---- paths and clients ----
    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.folder / "admin.kubeconfig"

    def bin(self, component: str, name: str) -> str:
        return str(ensure_built(component, self.components) / "bin" / name)

    def crds(self, component: str) -> Path:
        return ensure_built(component, self.components) / "crds"

    def write_kubeconfig(self, path: Path, token: str, user: str = "user") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority": str(self.pki["ca"]),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def request(self, path: str, token: str | None = None, method: str = "GET", body=None):  # type: ignore[no-untyped-def]
        """One API call with urllib; returns (status, parsed JSON or text)."""
        context = ssl.create_default_context(cafile=str(self.pki["ca"]))
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=context, timeout=10) as resp:
                text = resp.read().decode()
                status = resp.status
        except urllib.error.HTTPError as exc:
            text, status = exc.read().decode(), exc.code
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    # ---- processes ----
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        log = self.folder / "logs" / f"{name}.log"
        handle = log.open("ab")
        popen = subprocess.Popen(
            argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.folder,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        handle.close()
        proc = Process(name, popen, log)
        self.processes[name] = proc
        return proc

    def _wait(self, name: str, ready, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
        proc = self.processes[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise ClusterError(f"{name} exited ({proc.popen.returncode}):\n{proc.tail()}")
            with suppress(Exception):
                if ready():
                    return
            time.sleep(0.5)
        raise ClusterError(f"{name} not ready after {timeout:.0f} s:\n{proc.tail()}")

    def start(self) -> ControlPlane:
        self.pki = make_pki(self.folder / "pki", SERVICE_IP)
        etcd_client, etcd_peer, self.port, kcm_port, sched_port = free_ports(5)
        self._spawn(
            "etcd",
            [
                self.bin("etcd", "etcd"),
                f"--data-dir={self.folder / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_client}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                "--listen-metrics-urls=",
                "--log-level=warn",
                "--quota-backend-bytes=1073741824",
            ],
        )
        tokens = self.folder / "pki" / "tokens.csv"
        self.scheduler_token = secrets.token_hex(16)
        self.kcm_token = secrets.token_hex(16)
        tokens.write_text(
            f'{self.admin_token},admin,uid-admin,"system:masters"\n'
            f"{self.scheduler_token},system:kube-scheduler,uid-scheduler\n"
            f'{self.kcm_token},system:kube-controller-manager,uid-kcm,"system:masters"\n'
        )
        tokens.chmod(0o600)
        kube = "kubernetes"
        self._spawn(
            "kube-apiserver",
            [
                self.bin(kube, "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                "--endpoint-reconciler-type=none",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                f"--client-ca-file={self.pki['ca']}",
                f"--tls-cert-file={self.pki['serving']}",
                f"--tls-private-key-file={self.pki['serving_key']}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self.pki['sa_pub']}",
                f"--service-account-signing-key-file={self.pki['sa_key']}",
                "--enable-priority-and-fairness=false",
                "--allow-privileged=true",
                "--profiling=false",
                "--watch-cache=true",
                "--event-ttl=30m",
            ],
        )
        self._wait("kube-apiserver", lambda: self.request("/readyz")[0] == 200, timeout=180)
        self.write_kubeconfig(self.kubeconfig, self.admin_token, "admin")
        kcm_config = self.write_kubeconfig(self.folder / "kcm.kubeconfig", self.kcm_token)
        self._spawn(
            "kube-controller-manager",
            [
                self.bin(kube, "kube-controller-manager"),
                f"--kubeconfig={kcm_config}",
                f"--authentication-kubeconfig={kcm_config}",
                f"--authorization-kubeconfig={kcm_config}",
                "--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token,"
                "clusterrole-aggregation,podgc",
                f"--service-account-private-key-file={self.pki['sa_key']}",
                f"--root-ca-file={self.pki['ca']}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}",
                "--concurrent-gc-syncs=5",
            ],
        )
        sched_config = self.write_kubeconfig(
            self.folder / "scheduler.kubeconfig", self.scheduler_token
        )
        self._spawn(
            "kube-scheduler",
            [
                self.bin(kube, "kube-scheduler"),
                f"--kubeconfig={sched_config}",
                f"--authentication-kubeconfig={sched_config}",
                f"--authorization-kubeconfig={sched_config}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched_port}",
            ],
        )
        # the namespace controller and the service-account controller are live once `default`
        # has its ServiceAccount
        self._wait(
            "kube-controller-manager",
            lambda: self.request("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
        )
        return self

    def stop(self) -> None:
        for proc in reversed(list(self.processes.values())):
            proc.stop()
        self.processes.clear()
