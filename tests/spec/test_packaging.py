"""The distribution must ship every sub-package (the directory mapping is explicit)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOTS = {"psft.workflows": "workflows", "psft.trainer": "trainer", "psft.operator": "operator"}


def test_every_python_directory_is_a_listed_package(repo_root: Path) -> None:
    config = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == ROOTS
    listed = set(config["packages"])
    expected = set()
    for name, folder in ROOTS.items():
        for init in (repo_root / folder).rglob("*.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(repo_root / folder)
            expected.add(".".join([name, *rel.parts]))
    assert sorted(expected - listed) == [], "add these to [tool.setuptools] packages"


def test_operator_folder_does_not_shadow_the_stdlib(repo_root: Path) -> None:
    assert not (repo_root / "operator" / "__init__.py").exists()
