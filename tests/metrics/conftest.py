"""Fixtures of the metrics tests: real Prometheus + Pushgateway (see tests/servers)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from servers.prometheus import PrometheusStack, ToolMissing


@pytest.fixture(scope="session")
def prometheus_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusStack]:
    stack = PrometheusStack(tmp_path_factory.mktemp("prometheus"))
    try:
        stack.start()
    except ToolMissing as exc:  # not root and not installed: a developer machine
        pytest.skip(str(exc))
    yield stack
    stack.stop()
