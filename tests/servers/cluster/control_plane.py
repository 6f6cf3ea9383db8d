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
POD_MESSAGE_ANNOTATION = "psft.test/pod-message"


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

    def write_kubeconfig(
        self, path: Path, token: str, user: str = "user", namespace: str = "default"
    ) -> Path:
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
            "contexts": [
                {
                    "name": "test",
                    "context": {"cluster": "test", "user": user, "namespace": namespace},
                }
            ],
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
                # as on OpenShift: an owner reference with blockOwnerDeletion needs `update`
                # on the owner's finalizers, so the chart's RBAC must grant it
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
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
                # a real node (node.py) registers its bridge address, not a resolvable name
                "--kubelet-preferred-address-types=InternalIP,Hostname",
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
                "clusterrole-aggregation,podgc,nodelifecycle,root-ca-cert-publisher",
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

    # ---- kubectl-free helpers ----
    def apply_files(self, paths: list[Path]) -> None:
        """kubectl apply each file (server-side); CRDs among them are waited for."""
        from k8s_tools import run_tool

        for path in paths:
            run_tool(
                "kubectl",
                f"--kubeconfig={self.kubeconfig}",
                "apply",
                "--server-side",
                "--force-conflicts",
                "-f",
                str(path),
            )
        run_tool(
            "kubectl",
            f"--kubeconfig={self.kubeconfig}",
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        )

    def create(self, path: str, body: dict) -> dict:  # type: ignore[type-arg]
        status, out = self.request(path, method="POST", body=body)
        if status not in (200, 201, 409):
            raise ClusterError(f"POST {path}: {status} {out}")
        return out

    # ---- kwok: fake nodes whose pods run and exit on demand ----
    def start_kwok(self) -> None:
        stages = self.folder / "kwok-stages.yaml"
        stages.write_text(kwok_stages(self.module_dir("kwok")))
        (kwok_port,) = free_ports(1)
        self._spawn(
            "kwok",
            [
                self.bin("kwok", "kwok"),
                f"--kubeconfig={self.kubeconfig}",
                f"--manage-nodes-with-label-selector={KWOK_NODE_LABEL}=true",
                f"--config={stages}",
                f"--server-address=127.0.0.1:{kwok_port}",
                "--node-ip=127.0.0.1",
                "--cidr=10.244.0.1/16",
            ],
        )
        self._wait("kwok", lambda: self.request("/api/v1/nodes")[0] == 200)

    def add_node(
        self,
        name: str,
        gpus: int = 8,
        labels: dict[str, str] | None = None,
        taints: list[dict[str, str]] | None = None,
    ) -> None:
        capacity = {"cpu": "96", "memory": "1Ti", "pods": "110", "ephemeral-storage": "1Ti"}
        if gpus:
            capacity["nvidia.com/gpu"] = str(gpus)
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    KWOK_NODE_LABEL: "true",
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    **(labels or {}),
                },
                "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            },
            "spec": {"taints": taints or []},
            "status": {"capacity": capacity, "allocatable": capacity},
        }
        self.create("/api/v1/nodes", node)

        def ready() -> bool:
            _, got = self.request(f"/api/v1/nodes/{name}")
            return any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in got.get("status", {}).get("conditions", [])
            )

        self._wait("kwok", ready, timeout=60)

    def module_dir(self, component: str) -> Path:
        c = self.components[component]
        out = subprocess.run(
            ["go", "mod", "download", "-json", f"{c.module}@{c.version}"],
            capture_output=True,
            text=True,
            check=True,
            cwd=self.folder,
        ).stdout
        return Path(json.loads(out)["Dir"])

    # ---- Argo Workflows controller ----
    def start_argo(self, namespace: str = "argo", executor_image: str = "argoexec:test") -> None:
        self.apply_files(sorted(self.crds("argo").glob("argoproj.io_*.yaml")))
        self.create("/api/v1/namespaces", {"metadata": {"name": namespace}})
        # the controller serves no metrics here: nothing binds beyond what the test needs
        config = {"config": "metricsConfig: {enabled: false}\ntelemetryConfig: {enabled: false}\n"}
        self.create(
            f"/api/v1/namespaces/{namespace}/configmaps",
            {"metadata": {"name": "workflow-controller-configmap"}, "data": config},
        )
        # the controller reads its ConfigMap in its kubeconfig context's namespace
        argo_config = self.write_kubeconfig(
            self.folder / "argo.kubeconfig", self.admin_token, "argo", namespace
        )
        self._spawn(
            "workflow-controller",
            [
                self.bin("argo", "workflow-controller"),
                "--configmap=workflow-controller-configmap",
                f"--kubeconfig={argo_config}",
                f"--namespace={namespace}",
                f"--executor-image={executor_image}",
                "--executor-image-pull-policy=IfNotPresent",
                "--loglevel=info",
                "--workflow-workers=8",
                "--qps=50",
                "--burst=100",
            ],
            env={
                "KUBECONFIG": str(self.kubeconfig),
                "LEADER_ELECTION_DISABLE": "true",
                "ARGO_NAMESPACE": namespace,
                "POD_NAMESPACE": namespace,
            },
        )
        # healthz: the controller serves it on :6060 (hard-coded in v3.7 main.go)
        self._wait(
            "workflow-controller",
            lambda: (
                urllib.request.urlopen("http://127.0.0.1:6060/healthz", timeout=2).status == 200
            ),
        )

    # ---- KubeRay operator ----
    def start_kuberay(self) -> None:
        self.apply_files(sorted(self.crds("kuberay").glob("*.yaml")))
        metrics, probes = free_ports(2)
        self._spawn(
            "kuberay-operator",
            [
                self.bin("kuberay", "ray-operator"),
                f"--metrics-addr=127.0.0.1:{metrics}",
                f"--health-probe-bind-address=127.0.0.1:{probes}",
                "--enable-leader-election=false",
                "--log-stdout-encoder=console",
            ],
            env={"KUBECONFIG": str(self.kubeconfig)},
        )
        self._wait(
            "kuberay-operator",
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{probes}/readyz", timeout=2).status == 200
            ),
        )

    def stop(self) -> None:
        for proc in reversed(list(self.processes.values())):
            proc.stop()
        self.processes.clear()


# A pod on a kwok node runs (kwok's own pod-ready stage) until the test annotates it with
# psft.test/exit-code: then its containers terminate with that code (0: Succeeded, else
# Failed; the main container carries the code and psft.test/exit-message as its message;
# psft.test/pod-message becomes the pod's own status message, as the kubelet sets it).
POD_EXIT_STAGE = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: psft-pod-exit
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
    - key: '.metadata.annotations["psft.test/exit-code"]'
      operator: 'Exists'
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $code := index .metadata.annotations "psft.test/exit-code" }}
      {{ $message := or ( index .metadata.annotations "psft.test/exit-message" ) "" }}
      phase: {{ if eq $code "0" }}Succeeded{{ else }}Failed{{ end }}
      {{ with index .metadata.annotations "psft.test/pod-message" }}
      reason: Terminated
      message: {{ . | Quote }}
      {{ end }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "False"
        type: Ready
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: false
        restartCount: 0
        started: false
        state:
          terminated:
            {{ if eq .name "main" }}
            exitCode: {{ $code }}
            reason: {{ if eq $code "0" }}Completed{{ else }}Error{{ end }}
            message: {{ $message | Quote }}
            {{ else }}
            exitCode: 0
            reason: Completed
            {{ end }}
            startedAt: {{ $now | Quote }}
            finishedAt: {{ $now | Quote }}
      {{ end }}
"""


def kwok_stages(kwok_module: Path) -> str:
    """kwok's own node and pod stages (from its module), plus psft-pod-exit."""
    stage = kwok_module / "kustomize" / "stage"
    files = [
        stage / "node" / "fast" / "node-initialize.yaml",
        stage / "node" / "heartbeat-with-lease" / "node-heartbeat-with-lease.yaml",
        stage / "pod" / "fast" / "pod-ready.yaml",
        stage / "pod" / "fast" / "pod-delete.yaml",
    ]
    return "\n---\n".join([*(f.read_text() for f in files), POD_EXIT_STAGE])
