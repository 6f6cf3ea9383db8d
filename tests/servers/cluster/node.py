"""A real node for the test cluster: kubelet, containerd and runc running real containers.

The kubelet is built from the same Kubernetes version as the control plane (versions.toml,
component `kubelet`); containerd, runc and the CNI plugins are Debian's (installed by
servers/cluster/debian.py when missing). Everything the node creates is its own and is
removed by `stop()`:

- containerd: root, state, socket and its CNI config under the node's folder; CRI with
  `restrict_oom_score_adj = true` (root here lacks CAP_SYS_RESOURCE, so the sandbox's
  negative oom_score_adj would make runc fail), runc (crun 1.8 refuses the hybrid cgroup
  layout), the overlayfs snapshotter, network namespaces under its state folder, and our
  own sandbox image (images.py), so nothing is pulled.
- kubelet: root dir and pod logs under the folder, cgroupfs driver under the cgroup root
  `/psft-node` (made in each cgroup v1 controller here and removed at the end),
  `failCgroupV1: false` (this machine has cgroup v1), `failSwapOn: false`, image GC off (the
  imported images are all there is), its server on the node IP with anonymous access
  (only this machine can reach it; the API server needs it for `kubectl logs`).
- Pod network: CNI bridge `psft-br0` with host-local IPAM on 10.250.0.0/24. The bridge's
  address 10.250.0.1 is the node IP and the pods' default gateway; nothing is routed or
  NATed off the machine (no masquerade, no iptables rules).
- Services: a second bridge `psft-svc0` (no ports) carries cluster IPs as local addresses,
  and a userspace proxy (forward.py) forwards each one to a server on 127.0.0.1: the
  `kubernetes` Service 10.96.0.1:443 to the API server, so in-cluster clients
  (KUBERNETES_SERVICE_HOST/PORT, which the kubelet sets in every container) reach it the
  way they would through kube-proxy. There is no cluster DNS: clients use those variables
  (client-go and the Python client do), not the name kubernetes.default.svc.

One real node at a time per machine (the bridge and subnet are fixed): a file lock
serialises test processes that want one.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from servers.cluster.control_plane import ClusterError, ControlPlane, Process
from servers.cluster.debian import NODE_PACKAGES, ensure
from servers.cluster.images import Image, sandbox_image
from servers.seaweed import free_ports

NODE_NAME = "psft-node"
POD_BRIDGE, POD_SUBNET, NODE_IP = "psft-br0", "10.250.0.0/24", "10.250.0.1"
SERVICE_BRIDGE = "psft-svc0"
CGROUP_ROOT = "psft-node"
CGROUP_BASE = Path("/sys/fs/cgroup")
LOCK_FILE = "/tmp/.psft-real-node.lock"
# the live node's folder and its run's mark, removed by stop(): found at start, they name
# a run killed before its stop() (pytest killed by a CI timeout, a snapshot taken mid-run)
STATE_FILE = Path("/tmp/.psft-real-node.folder")
# every process a test run starts inherits this mark from its environment (tests/conftest.py
# sets it first thing): what the next run finds a killed run's processes by
RUN_ENV = "PSFT_TEST_RUN"
# kubelet tunes these on start (protectKernelDefaults: false); stop() puts them back
KERNEL_TUNABLES = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
TESTS = Path(__file__).resolve().parents[2]
IMPORT_MARGIN = 2 * 10**9  # pods' writable layers, checkpoints, logs


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class RealNode:
    plane: ControlPlane
    name: str = NODE_NAME
    services: dict[str, str] = field(default_factory=dict)
    """cluster IP:port -> 127.0.0.1:port, besides the `kubernetes` Service."""
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder = self.plane.folder / "node"
        self.socket = self.folder / "containerd" / "containerd.sock"
        self._lock = None
        self._sysctls: dict[str, str] = {}
        self._cgroups: list[Path] = []

    # ---- start ----
    def start(self) -> RealNode:
        if os.geteuid() != 0:
            raise PermissionError("a real node runs containers: it needs root")
        self.tools = ensure(NODE_PACKAGES)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(LOCK_FILE, "w")  # noqa: SIM115 (held until stop)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self._reap_killed_run()
        STATE_FILE.write_text(json.dumps({"node": str(self.folder), "run": run_mark()}))
        self._network()
        self._start_proxy()
        self._start_containerd()
        self.import_image(sandbox_image())
        self._start_kubelet()

    def _reap_killed_run(self) -> None:
        """What a run killed before its stop() left (we hold the lock: no live node owns
        it): its processes (found by their run mark), its containers' cgroups, its mounts
        and its stores, which hold the imported images (over 11 GB) and pin the pytest
        folder pytest would delete."""
        self._remove_network()
        try:
            state = json.loads(STATE_FILE.read_text())
            stale, mark = Path(state["node"]), str(state["run"])
        except (OSError, ValueError, KeyError, TypeError):
            STATE_FILE.unlink(missing_ok=True)
            return
        if mark != run_mark():  # else a node of this run that did not stop: not killed
            _kill_processes_of(stale, run=mark)
            self._remove_cgroups(_cgroup_paths())
            if not _unmount_under(stale):
                _remove_stores(stale)
        STATE_FILE.unlink(missing_ok=True)

    def _network(self) -> None:
        prefix = POD_SUBNET.split("/")[1]
        _ip("link", "add", POD_BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{NODE_IP}/{prefix}", "dev", POD_BRIDGE)
        _ip("link", "set", POD_BRIDGE, "up")
        _ip("link", "add", SERVICE_BRIDGE, "type", "bridge")
        _ip("link", "set", SERVICE_BRIDGE, "up")
        for address in ["10.96.0.1:443", *self.services]:
            with suppress(subprocess.CalledProcessError):  # two ports on one IP
                _ip("addr", "add", f"{address.rsplit(':', 1)[0]}/32", "dev", SERVICE_BRIDGE)
        cni = self.folder / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "0.4.0",
            "name": "psft",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": POD_BRIDGE,
                    "isGateway": True,
                    "isDefaultGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                        "dataDir": str(cni / "ipam"),
                    },
                }
            ],
        }
        (cni / "net.d" / "10-psft.conflist").write_text(json.dumps(conflist, indent=1))

    def _remove_network(self) -> None:
        for bridge in (POD_BRIDGE, SERVICE_BRIDGE):
            _ip("link", "del", bridge, check=False)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        proc = self.plane._spawn(name, argv, env=env)
        self.processes.append(proc)
        return proc

    def _start_proxy(self) -> None:
        pairs = [f"10.96.0.1:443=127.0.0.1:{self.plane.port}"]
        pairs += [f"{ip}={target}" for ip, target in self.services.items()]
        proc = self._spawn(
            "service-proxy",
            [sys.executable, "-m", "servers.cluster.forward", *pairs],
            env={"PYTHONPATH": str(TESTS)},
        )
        self.plane._wait("service-proxy", lambda: "ready" in proc.log.read_text(), timeout=30)

    def _start_containerd(self) -> None:
        base = self.folder / "containerd"
        (stream_port,) = free_ports(1)
        config = f"""\
version = 2
root = "{base / "root"}"
state = "{base / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{base / "opt"}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image().containerd_ref}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "{stream_port}"
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{self.tools["runc"]}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{self.folder / "cni" / "net.d"}"
    max_conf_num = 1
"""
        base.mkdir(parents=True, exist_ok=True)
        (base / "config.toml").write_text(config)
        self._spawn(
            "containerd",
            [self.tools["containerd"], f"--config={base / 'config.toml'}", "--log-level=info"],
            env={"PATH": f"/usr/sbin:/usr/bin:/sbin:/bin:{os.environ.get('PATH', '')}"},
        )
        self.plane._wait(
            "containerd",
            lambda: self.ctr("version", check=False).returncode == 0,
            timeout=60,
        )

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 1800
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.tools["ctr"], f"--address={self.socket}", "--namespace=k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"ctr {' '.join(args)}: {proc.stderr or proc.stdout}")
        return proc

    def import_image(self, image: Image) -> float:
        """`ctr images import` of one image (unpacked for the CRI's snapshotter): seconds.

        The layout folder goes to ctr as a tar stream on its stdin (`import -`): no archive
        file is written."""
        started = time.monotonic()
        self._check_room_for(image)
        tar = subprocess.Popen(
            ["tar", "-C", str(image.layout), "-cf", "-", "oci-layout", "index.json", "blobs"],
            stdout=subprocess.PIPE,
        )
        imported = subprocess.run(
            [
                self.tools["ctr"],
                f"--address={self.socket}",
                "--namespace=k8s.io",
                "images",
                "import",
                "--snapshotter=overlayfs",
                "-",
            ],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise ClusterError(f"ctr images import of {image.layout}: {imported.stderr}")
        listed = self.ctr("images", "ls", "-q").stdout.split()
        if image.containerd_ref not in listed:
            raise ClusterError(f"{image.containerd_ref} not in containerd after import: {listed}")
        return time.monotonic() - started

    def _check_room_for(self, image: Image) -> None:
        """containerd keeps an imported layer twice (the blob in its content store and the
        unpacked snapshot): refuse early, naming the folder, rather than fill the disk
        under every other test of the run."""
        size = sum(p.stat().st_size for p in image.layout.rglob("*") if p.is_file())
        need = 2 * size + IMPORT_MARGIN
        free = shutil.disk_usage(self.folder).free
        if free < need:
            raise ClusterError(
                f"not enough disk to import {image.ref} under {self.folder}: it needs about "
                f"{need / 1e9:.1f} GB (content store + unpacked layers), {free / 1e9:.1f} GB "
                "are free; free some (old /tmp/pytest-of-* folders) or point --basetemp "
                "at a larger disk"
            )

    def _cgroup_root(self) -> None:
        """`/psft-node` in every cgroup v1 controller (this machine), or in the cgroup v2
        hierarchy with the controllers delegated to it (not tried here: no v2-only host)."""
        for path in _cgroup_paths():
            path.mkdir(exist_ok=True)
            self._cgroups.append(path)
            if path.parent == CGROUP_BASE:  # cgroup v2 only
                wanted = (CGROUP_BASE / "cgroup.controllers").read_text().split()
                with suppress(OSError):
                    (path / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
            elif path.parent.name == "cpuset":  # a new cpuset starts empty
                for name in ("cpuset.cpus", "cpuset.mems"):
                    (path / name).write_text((path.parent / name).read_text())

    def _start_kubelet(self) -> None:
        for tunable in KERNEL_TUNABLES:
            with suppress(OSError):
                self._sysctls[tunable] = (Path("/proc/sys") / tunable).read_text().strip()
        self._cgroup_root()
        kubelet_dir = self.folder / "kubelet"
        kubelet_dir.mkdir(exist_ok=True)
        port, healthz = free_ports(2)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "imageServiceEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_ROOT}",
            "failCgroupV1": False,
            "failSwapOn": False,
            "podLogsDir": str(self.folder / "pod-logs"),
            "authentication": {
                "anonymous": {"enabled": True},
                "webhook": {"enabled": False},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "imageMinimumGCAge": "24h",
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "staticPodPath": "",
            "enableDebuggingHandlers": True,
            "maxPods": 30,
            "registerNode": True,
            "protectKernelDefaults": False,
            "localStorageCapacityIsolation": True,
        }
        (kubelet_dir / "config.yaml").write_text(yaml.safe_dump(config))
        kubeconfig = self.plane.write_kubeconfig(
            self.folder / "kubelet.kubeconfig", self.plane.admin_token, "kubelet"
        )
        self._spawn(
            "kubelet",
            [
                self._kubelet_binary(),
                f"--config={kubelet_dir / 'config.yaml'}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={kubelet_dir / 'root'}",
                f"--cert-dir={kubelet_dir / 'pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={NODE_IP}",
                "--v=2",
            ],
            env={"PATH": f"/usr/sbin:/usr/bin:/sbin:/bin:{os.environ.get('PATH', '')}"},
        )

        def ready() -> bool:
            _, got = self.plane.request(f"/api/v1/nodes/{self.name}")
            return any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in got.get("status", {}).get("conditions", [])
            )

        self.plane._wait("kubelet", ready, timeout=180)

    def _kubelet_binary(self) -> str:
        return self.plane.bin("kubelet", "kubelet")

    def pod_log(self, pod: dict, container: str = "main") -> str:  # type: ignore[type-arg]
        """A container's log from the node's pod log folder (it outlives the pod object,
        which Argo's podGC deletes: `kubectl logs` needs the pod)."""
        meta = pod["metadata"]
        folder = self.folder / "pod-logs" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        return "".join(
            path.read_text(errors="replace") for path in sorted((folder / container).glob("*.log"))
        )

    # ---- stop ----
    def stop(self) -> None:
        """Pods, containers, kubelet, containerd, the proxy, mounts, cgroups, bridges."""
        kubelet = next((p for p in self.processes if p.name == "kubelet"), None)
        if kubelet and kubelet.popen.poll() is None:
            self._delete_pods()
        if kubelet:
            kubelet.stop()
        containerd = next((p for p in self.processes if p.name == "containerd"), None)
        if containerd and containerd.popen.poll() is None:
            self._remove_containers()
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        _kill_processes_of(self.folder)  # containerd's shims outlive it
        mounted = _unmount_under(self.folder)
        self._remove_cgroups(self._cgroups)
        self._cgroups.clear()
        if not mounted:
            _remove_stores(self.folder)
        self._remove_network()
        if self._started_here():
            STATE_FILE.unlink(missing_ok=True)
        for tunable, value in self._sysctls.items():
            with suppress(OSError):
                (Path("/proc/sys") / tunable).write_text(value)
        if self._lock:
            self._lock.close()
            self._lock = None

    def _delete_pods(self, timeout: float = 60) -> None:
        status, pods = self.plane.request(f"/api/v1/pods?fieldSelector=spec.nodeName%3D{self.name}")
        if status != 200:
            return
        for pod in pods.get("items", []):
            meta = pod["metadata"]
            self.plane.request(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                method="DELETE",
                body={"gracePeriodSeconds": 0},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listed = self.ctr("containers", "ls", "-q", check=False, timeout=30).stdout.split()
            if not listed:
                return
            time.sleep(1)

    def _remove_containers(self) -> None:
        """Whatever the kubelet did not remove: tasks killed, containers deleted."""
        for cid in self.ctr("tasks", "ls", "-q", check=False, timeout=30).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
        time.sleep(0.5)
        for cid in self.ctr("containers", "ls", "-q", check=False, timeout=30).stdout.split():
            self.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
            self.ctr("containers", "delete", cid, check=False, timeout=30)

    def _started_here(self) -> bool:
        with suppress(OSError, ValueError, KeyError, TypeError):
            return bool(json.loads(STATE_FILE.read_text())["node"] == str(self.folder))
        return False

    @staticmethod
    def _remove_cgroups(roots: list[Path]) -> None:
        for root in roots:
            if not root.exists():
                continue
            for dirpath, _dirnames, _files in sorted(os.walk(root), key=lambda w: -len(w[0])):
                path = Path(dirpath)
                for _ in range(20):
                    try:
                        path.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        _kill_cgroup(path)
                        time.sleep(0.2)


def _cgroup_paths() -> list[Path]:
    """Where `_cgroup_root` puts the node's cgroup in each hierarchy."""
    if (CGROUP_BASE / "cgroup.controllers").exists():
        return [CGROUP_BASE / CGROUP_ROOT]
    return [
        controller / CGROUP_ROOT
        for controller in sorted(CGROUP_BASE.iterdir())
        if controller.name != "unified" and (controller / "cgroup.procs").exists()
    ]


def run_mark() -> str:
    """This run's mark (set here if tests/conftest.py did not: then only the processes
    started from now on carry it)."""
    return os.environ.setdefault(RUN_ENV, f"{os.getpid()}-{secrets.token_hex(4)}")


def _kill_processes_of(folder: Path, run: str | None = None) -> None:
    """SIGKILL containerd's shims of a node folder (they name its socket) and, given a
    killed run's mark, every process that carries it in its environment: the control
    plane's, the node's, the run's servers (a shell in the run's folder does not)."""
    marker = str(folder / "containerd" / "containerd.sock")
    mark = f"{RUN_ENV}={run}".encode() if run else None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            shim = "containerd-shim" in cmdline and marker in cmdline
            if shim or (mark and mark in (proc / "environ").read_bytes().split(b"\0")):
                os.kill(int(proc.name), signal.SIGKILL)


def _mounts_under(folder: Path) -> list[str]:
    prefix = str(folder) + "/"
    mounts = [
        line.split()[1].replace("\\040", " ")
        for line in Path("/proc/self/mounts").read_text().splitlines()
    ]
    return sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True)


def _unmount_under(folder: Path) -> list[str]:
    """Unmount what a node mounted under its folder: what is still mounted after."""
    for _ in range(3):
        ours = _mounts_under(folder)
        if not ours:
            return []
        for mount in ours:
            subprocess.run(["umount", "-l", mount], capture_output=True)
    return _mounts_under(folder)


def _remove_stores(folder: Path) -> None:
    """containerd's content and snapshots (the imported images, twice their size: over
    11 GB with the trainer image) and the kubelet's pod volumes. Only once nothing is
    mounted under the folder, so a removal never reaches through a mount; the logs
    (containerd, kubelet, pods) stay for the test's diagnosis."""
    for store in (folder / "containerd" / "root", folder / "kubelet" / "root"):
        shutil.rmtree(store, ignore_errors=True)


def _kill_cgroup(path: Path) -> None:
    with suppress(OSError):
        for pid in (path / "cgroup.procs").read_text().split():
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
