"""Helpers of the chart tests (imported by conftest.py and the tests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "psft"
RELEASE = "psft"
NAMESPACE = "psft-system"


Render = Callable[..., list[dict[str, Any]]]


ALL_ON: dict[str, Any] = {
    "operator": {
        "replicas": 2,
        "watchNamespaces": ["team-a", "team-b"],
        "rbac": {"readSecrets": True},
        "image": {"digest": "sha256:" + "0" * 64},
    },
    "workflows": {"namespaces": ["team-a", "team-b"], "rayJobs": True},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "podMonitor": {"enabled": True},
    },
    "alerts": {"enabled": True, "additionalAlertLabels": {"team": "ml"}},
    "dashboards": {"enabled": True, "annotations": {"grafana_folder": "PSFT"}},
    "commonLabels": {"cost-center": "research"},
}
"""Every feature flag of the chart on."""


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str, name_part: str = "") -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if name_part in d["metadata"]["name"]]
    assert len(found) == 1, f"expected one {kind} named *{name_part}*, got {len(found)}"
    return found[0]
