"""The generated dashboards against Grafana's own types: `@grafana/schema` with `tsc`.

grafana-foundation-sdk 10.1 builds for Grafana 10.1, so the check uses @grafana/schema
10.1.9 (the Dashboard, VariableModel and panel option types of that release). Each
dashboard becomes a TypeScript object literal typed as `Dashboard`, and each panel's
options (and timeseries field config) as that panel plugin's `Options`/`FieldConfig`;
`tsc --noEmit --strict` then rejects unknown keys, wrong types and invalid enum values.
Grafana's JSON writes enums as their values, so string enums are widened to their
literal values (`${Enum}`), which keeps them exact.

The npm packages are installed once into a cache folder. Skipped only when npm itself
is missing (CI has npm and the npm registry).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "charts" / "psft" / "dashboards"
PACKAGES = ("@grafana/schema@10.1.9", "typescript@5.6.3")
PANEL_TYPES = {"timeseries": "TimeSeries", "stat": "Stat", "bargauge": "BarGauge"}
NPM = shutil.which("npm")

JSON_TYPE = (
    "type Json<T> = T extends string ? T | `${T}` "
    ": T extends number | boolean | null | undefined ? T "
    ": T extends Array<infer U> ? Array<Json<U>> "
    ": T extends object ? { [K in keyof T]: Json<T[K]> } : T;"
)


@pytest.fixture(scope="session")
def tsc() -> Path:
    if NPM is None:
        pytest.skip("npm is not installed: cannot check dashboards against @grafana/schema")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    root = Path(base) / "psft" / ("npm-" + "-".join(p.replace("/", "_") for p in PACKAGES))
    binary = root / "node_modules" / ".bin" / "tsc"
    if not binary.exists():
        root.mkdir(parents=True, exist_ok=True)
        (root / "package.json").write_text('{"private": true}\n')
        proc = subprocess.run(
            [NPM, "install", "--no-audit", "--no-fund", "--ignore-scripts", *PACKAGES],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"npm install failed:\n{proc.stdout}\n{proc.stderr}"
    return binary


def typescript_for(boards: dict[str, dict[str, Any]]) -> str:
    lines = ["import type { Dashboard } from '@grafana/schema';"]
    for plugin, name in PANEL_TYPES.items():
        lines.append(
            f"import type * as {plugin} from '@grafana/schema/dist/esm/raw/composable/"
            f"{plugin}/panelcfg/x/{name}PanelCfg_types.gen';"
        )
    lines.append(JSON_TYPE)
    for i, (name, board) in enumerate(sorted(boards.items())):
        lines.append(f"// {name}")
        lines.append(f"export const dashboard{i}: Json<Dashboard> = {json.dumps(board)};")
        for panel in board["panels"]:
            kind, pid = panel["type"], f"{i}_{panel['id']}"
            if kind == "row":
                continue
            assert kind in PANEL_TYPES, f"{name}: no type check for panel type {kind!r}"
            lines.append(
                f"export const options{pid}: Json<{kind}.Options> = {json.dumps(panel['options'])};"
            )
            if kind == "timeseries":
                custom = json.dumps(panel["fieldConfig"]["defaults"].get("custom", {}))
                lines.append(f"export const custom{pid}: Json<timeseries.FieldConfig> = {custom};")
    return "\n".join(lines) + "\n"


def run_tsc(tsc: Path, source: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    (workdir / "check.ts").write_text(source)
    config = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "target": "es2022",
            "module": "commonjs",
            "moduleResolution": "node",
            "skipLibCheck": True,
            "types": [],
            "baseUrl": str(tsc.parents[2]),
            "typeRoots": [],
            "paths": {
                "@grafana/schema": ["node_modules/@grafana/schema"],
                "@grafana/schema/*": ["node_modules/@grafana/schema/*"],
            },
        },
        "files": ["check.ts"],
    }
    (workdir / "tsconfig.json").write_text(json.dumps(config))
    return subprocess.run(
        [str(tsc), "-p", str(workdir / "tsconfig.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )


def committed_boards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(COMMITTED.glob("*.json"))}


def test_dashboards_match_grafana_schema_types(tsc: Path, tmp_path: Path) -> None:
    boards = committed_boards()
    assert boards
    proc = run_tsc(tsc, typescript_for(boards), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_type_check_rejects_a_broken_dashboard(tsc: Path, tmp_path: Path) -> None:
    boards = committed_boards()
    board = boards["psft-training.json"]
    board["graphTooltip"] = "shared"  # an enum of numbers
    board["templating"]["list"][1]["refreshh"] = 2  # unknown key
    stat = next(p for p in board["panels"] if p["type"] == "stat")
    stat["options"]["colorMode"] = "rainbow"  # not a BigValueColorMode
    proc = run_tsc(tsc, typescript_for({"broken.json": board}), tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if "error TS" in line]
    assert len(errors) == 3, proc.stdout
    assert "rainbow" in proc.stdout and "refreshh" in proc.stdout
