"""Grafana dashboards of PSFT, built with grafana-foundation-sdk (Grafana's own builders).

`python -m psft.workflows.dashboards` writes them to charts/psft/dashboards/, where the
chart packs them into ConfigMaps; tests/dashboards regenerates and compares, and checks
the JSON against the `@grafana/schema` TypeScript types.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, prometheus, stat, timeseries
from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dash_m

from psft.workflows.dashboards.panels import DASHBOARDS, DashboardDef, PanelDef

GRID_WIDTH = 24
DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")
REFRESH_ON_TIME_CHANGE = dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED


def _last_value() -> common_b.ReduceDataOptions:
    return common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False).fields("")


def _panel_builder(p: PanelDef) -> Any:
    if p.kind == "timeseries":
        builder = (
            timeseries.Panel()
            .legend(
                common_b.VizLegendOptions()
                .display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM)
                .show_legend(True)
                .calcs([])
            )
            .tooltip(
                common_b.VizTooltipOptions()
                .mode(common.TooltipDisplayMode.MULTI)
                .sort(common.SortOrder.DESCENDING)
            )
            .line_width(1)
            .fill_opacity(0)
            .show_points(common.VisibilityMode.NEVER)
            .span_nulls(True)
        )
        if p.log_scale:
            builder = builder.scale_distribution(
                common_b.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10)
            )
        return builder
    if p.kind == "stat":
        return (
            stat.Panel()
            .reduce_options(_last_value())
            .color_mode(common.BigValueColorMode.VALUE)
            .graph_mode(common.BigValueGraphMode.NONE)
            .justify_mode(common.BigValueJustifyMode.AUTO)
            .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
            .orientation(common.VizOrientation.AUTO)
        )
    return (
        bargauge.Panel()
        .reduce_options(_last_value())
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
        .value_mode(common.BarGaugeValueMode.COLOR)
        .orientation(common.VizOrientation.HORIZONTAL)
        .min(0)
        .max(1)
    )


def _panel(p: PanelDef, panel_id: int, x: int, y: int) -> Any:
    builder = (
        _panel_builder(p)
        .id(panel_id)
        .title(p.title)
        .description(p.description)
        .datasource(DATASOURCE)
        .unit(p.unit)
        .grid_pos(dash_m.GridPos(h=p.height, w=p.width, x=x, y=y))
    )
    for i, q in enumerate(p.queries):
        builder = builder.with_target(
            prometheus.Dataquery()
            .expr(q.expr)
            .legend_format(q.legend)
            .ref_id(chr(ord("A") + i))
            .range()
        )
    return builder


def _variables(d: DashboardDef) -> list[Any]:
    variables: list[Any] = [
        dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus"),
    ]
    namespace_source = "psft_train_step" if d.job_variable else "psft_jobs"
    variables.append(
        dash_b.QueryVariable("namespace")
        .label("Namespace" if d.job_variable else "Operator namespace")
        .datasource(DATASOURCE)
        .query(f"label_values({namespace_source}, namespace)")
        .refresh(REFRESH_ON_TIME_CHANGE)
        .sort(dash_m.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    if d.job_variable:
        variables.append(
            dash_b.QueryVariable("job")
            .label("PSFTJob")
            .description("Pick a PSFT job and its SFT baseline to compare them.")
            .datasource(DATASOURCE)
            .query('label_values(psft_train_step{namespace=~"$namespace"}, job)')
            .refresh(REFRESH_ON_TIME_CHANGE)
            .sort(dash_m.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    return variables


def build_dashboard(d: DashboardDef) -> dict[str, Any]:
    """One dashboard as the JSON object Grafana stores (rows, then panels wrapped at 24)."""
    builder = (
        dash_b.Dashboard(d.title)
        .uid(d.uid)
        .description(d.description)
        .tags(["psft"])
        .editable()
        .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
        .time("now-6h", "now")
        .timezone("browser")
        .refresh("30s")
        .variables(_variables(d))
    )
    panel_id, y = 1, 0
    for row in d.rows:
        builder = builder.with_row(
            dash_b.Row(row.title).id(panel_id).grid_pos(dash_m.GridPos(h=1, w=24, x=0, y=y))
        )
        panel_id, y = panel_id + 1, y + 1
        x, line_height = 0, 0
        for p in row.panels:
            if x + p.width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            builder = builder.with_panel(_panel(p, panel_id, x, y))
            panel_id += 1
            x += p.width
            line_height = max(line_height, p.height)
        y += line_height
    return _normalise(json.loads(json.dumps(builder.build(), cls=JSONEncoder)))


def _normalise(board: dict[str, Any]) -> dict[str, Any]:
    """Align the SDK's output with Grafana's schema (`@grafana/schema` 10.1 types): the
    SDK writes the interval-variable fields auto/auto_count/auto_min on every variable,
    and omits `datasource` (required, nullable) on datasource variables."""
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") != "interval":
            for key in ("auto", "auto_count", "auto_min"):
                variable.pop(key, None)
        variable.setdefault("datasource", None)
    return board


def dashboard_files() -> dict[str, str]:
    """File name -> JSON text (stable: sorted keys, 2-space indent, final newline)."""
    return {
        f"{d.uid}.json": json.dumps(build_dashboard(d), indent=2, sort_keys=True) + "\n"
        for d in DASHBOARDS
    }


def write_dashboards(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in dashboard_files().items():
        path = out_dir / name
        path.write_text(text)
        written.append(path)
    return written
