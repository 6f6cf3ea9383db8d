"""PSFT dashboards: panel definitions as data, Grafana JSON, and PNGs of a local run.

`render_panels` (matplotlib) is imported lazily so that the operator and the CLI do not
pay for matplotlib; `build_dashboard` needs grafana-foundation-sdk (dev extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from psft.workflows.dashboards.panels import DASHBOARDS, DashboardDef, PanelDef, local_panels

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["DASHBOARDS", "DashboardDef", "PanelDef", "local_panels", "render_panels"]


def render_panels(
    metrics_files: Mapping[str, Path],
    out_dir: Path,
    *,
    eval_files: Mapping[str, Path] | None = None,
) -> list[Path]:
    """Draw the dashboard panels as PNGs from metrics.jsonl files keyed by label."""
    from psft.workflows.dashboards.render import render_panels as _render

    return _render(metrics_files, out_dir, eval_files=eval_files)
