"""Fixtures for the chart tests: real helm 4.3 on a copy of charts/psft.

The chart declares no dependencies, so the copy is the chart as a fresh git checkout has
it: any local `charts/` folder or `Chart.lock` (left over from an old `helm dependency
update`) is left out, since helm would load whatever it finds there as sub-charts.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from chart_helpers import CHART, NAMESPACE, RELEASE, Render
from k8s_tools import run_tool


@pytest.fixture(scope="session")
def chart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("chart") / "psft"
    shutil.copytree(CHART, target, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    return target


@pytest.fixture(scope="session")
def helm_template(chart_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Render:
    """Render the chart with extra values (a nested dict) and return its documents."""
    values_dir = tmp_path_factory.mktemp("values")
    counter = iter(range(1_000_000))

    def render(values: dict[str, Any] | None = None, *extra: str) -> list[dict[str, Any]]:
        args = ["template", RELEASE, str(chart_dir), "--namespace", NAMESPACE]
        if values is not None:
            path = values_dir / f"values-{next(counter)}.yaml"
            path.write_text(yaml.safe_dump(values))
            args += ["--values", str(path)]
        proc = run_tool("helm", *args, *extra)
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    return render
