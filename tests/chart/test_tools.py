"""tests/k8s_tools.py: the helm and kubectl of the PyPI layer, extracted once and cached."""

from __future__ import annotations

from pathlib import Path

import pytest
from k8s_tools import run_tool, tool_path


def test_helm_and_kubectl_versions() -> None:
    helm = run_tool("helm", "version", "--template", "{{ .Version }}").stdout
    assert helm.startswith("v4.3."), helm
    kubectl = run_tool("kubectl", "version", "--client", "-o", "yaml").stdout
    assert "gitVersion: v1.37." in kubectl, kubectl


def test_extraction_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PSFT_TOOLS_CACHE", str(tmp_path / "cache"))
    first = tool_path("kubectl")
    stamp = first.stat().st_mtime_ns
    assert tool_path("kubectl") == first and first.stat().st_mtime_ns == stamp
    assert tool_path("helm").parent == first.parent
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.parent.name]
