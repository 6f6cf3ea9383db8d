"""A real control plane (etcd, kube-apiserver, controller-manager, scheduler) for the tests
in this folder, built from Go modules on first use (tests/servers/cluster/build.py) and
started once per session on 127.0.0.1; see tests/servers/cluster/control_plane.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from k8s_tools import run_tool
from servers.cluster.control_plane import ControlPlane

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "charts/psft/crds/psftjobs.psft.dev.yaml"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    try:
        yield plane.start()
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane):  # type: ignore[no-untyped-def]
    """kubectl 1.37 (real) against the test cluster as admin; returns the CompletedProcess."""

    def run(*args: str, check: bool = True):  # type: ignore[no-untyped-def]
        return run_tool("kubectl", f"--kubeconfig={control_plane.kubeconfig}", *args, check=check)

    return run


@pytest.fixture(scope="session")
def psft_crd(kubectl) -> Path:  # type: ignore[no-untyped-def]
    kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/psftjobs.psft.dev")
    return CRD_FILE
