"""Fixtures of the operator tests: the Kubernetes API emulator and clients pointed at it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(
    0, str(Path(__file__).parent)
)  # kube_emulator, operator_harness (tests/operator helpers)

from kube_emulator import EmulatorThread
from operator_harness import NS


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    with EmulatorThread() as emu:
        emu.create_namespace(NS)  # the operator's namespace exists before it starts
        # the stage pods' ServiceAccount, which the chart creates (the operator waits for it)
        emu.put_object(
            "v1/serviceaccounts", {"metadata": {"name": "psft-workflow", "namespace": NS}}
        )
        yield emu


@pytest.fixture
def kubeconfig(emulator: EmulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """KUBECONFIG for kopf's login and the kubernetes client (which also caches a default path)."""
    import kubernetes.config.kube_config as kube_config

    path = emulator.write_kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    return path


@pytest.fixture
def api(kubeconfig: Path):
    """A `kubernetes` ApiClient talking to the emulator."""
    import kubernetes

    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    yield client
    client.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # kmock 0.8 reads its bundled discovery data with a deprecated importlib call
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(
                pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")
            )
