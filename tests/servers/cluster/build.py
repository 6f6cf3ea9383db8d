"""Builds the real control plane the cluster tests run, from Go modules pinned in versions.toml.

Each component is built from a small wrapper module in the cache (``require`` the component,
``replace`` what its own go.mod replaces with local paths by the published modules), so
modules that carry ``replace`` lines, such as k8s.io/kubernetes, build like any other. Binaries
and CRDs land in ``<cache>/<name>-<version>-<digest>/`` behind a ``.complete`` marker; a
second call finds the marker and returns at once. A file lock keeps concurrent builders
(parallel test processes, CI's warm-up) from building the same thing twice.

    python tests/servers/cluster/build.py          # build everything, print the times
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

VERSIONS_FILE = Path(__file__).with_name("versions.toml")
GO_DIRECTIVE = re.compile(r"^go (\d+\.\d+(?:\.\d+)?)\s*$", re.M)
REPLACE_LINE = re.compile(r"^\s*(?:replace\s+)?(\S+)(?:\s+(\S+))?\s+=>\s+(\S+)(?:\s+(\S+))?\s*$")


class BuildError(RuntimeError):
    """A component did not build; the message names the module, the command and its output."""


@dataclass(frozen=True)
class Component:
    name: str
    module: str
    version: str
    packages: tuple[str, ...]
    binary: str | None = None
    staging_version: str | None = None
    sibling_modules: tuple[str, ...] = ()
    version_ldflags: str | None = None
    crds: str | None = None
    symlinks: tuple[tuple[str, str], ...] = ()
    """(path, target) of symbolic links in the upstream repository: module zips leave links
    out, so the build copies the module and puts each link back before building."""

    @property
    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:10]


def load_components(path: Path = VERSIONS_FILE) -> dict[str, Component]:
    data = tomllib.loads(path.read_text())
    return {
        name: Component(
            name=name,
            module=entry["module"],
            version=entry["version"],
            packages=tuple(entry["packages"]),
            binary=entry.get("binary"),
            staging_version=entry.get("staging_version"),
            sibling_modules=tuple(entry.get("sibling_modules", ())),
            version_ldflags=entry.get("version_ldflags"),
            crds=entry.get("crds"),
            symlinks=tuple(sorted(entry.get("symlinks", {}).items())),
        )
        for name, entry in data.items()
    }


def cache_root() -> Path:
    if env := os.environ.get("PSFT_CLUSTER_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "psft" / "cluster"


def component_dir(component: Component) -> Path:
    return cache_root() / f"{component.name}-{component.version}-{component.digest}"


def _go(args: list[str], cwd: Path, what: str) -> str:
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOWORK": "off"}
    proc = subprocess.run(["go", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-4000:]
        raise BuildError(f"{what}: `go {' '.join(args)}` failed in {cwd}:\n{tail}")
    return proc.stdout


def _download(component: Component, cwd: Path) -> dict:
    out = _go(
        ["mod", "download", "-json", f"{component.module}@{component.version}"], cwd, component.name
    )
    return json.loads(out)


def _upstream_replaces(gomod: str, component: Component) -> list[str]:
    """The replace directives the wrapper needs: upstream's non-local ones as they are, its local
    ones (``=> ./staging/...``, ``=> ../api``) pointed at the published module of that name."""
    lines: list[str] = []
    in_block = False
    for raw in gomod.splitlines():
        line = raw.split("//")[0].rstrip()
        if line.strip() == "replace (":
            in_block = True
            continue
        if in_block and line.strip() == ")":
            in_block = False
            continue
        if not (in_block or line.startswith("replace ")):
            continue
        match = REPLACE_LINE.match(line)
        if not match:
            continue
        old, old_version, new, new_version = match.groups()
        if not new.startswith("."):
            lhs = f"{old} {old_version}" if old_version else old
            lines.append(f"{lhs} => {new} {new_version or ''}".rstrip())
        elif old.startswith("k8s.io/") and component.staging_version:
            lines.append(f"{old} => {old} {component.staging_version}")
        elif old in component.sibling_modules:
            lines.append(f"{old} => {old} {component.version}")
        # other local replaces (etcd's FORBIDDEN_DEPENDENCY guards) name modules nothing needs
    return lines


def _write_wrapper(
    component: Component, src: Path, upstream_gomod: str, local_copy: str | None = None
) -> None:
    go_version = GO_DIRECTIVE.search(upstream_gomod)
    lines = _upstream_replaces(upstream_gomod, component)
    if local_copy:
        lines.append(f"{component.module} => ./{local_copy}")
    replaces = "\n".join(f"\t{line}" for line in lines)
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(
        f"module psft.test/build/{component.name}\n\n"
        f"go {go_version.group(1) if go_version else '1.24'}\n\n"
        f"require {component.module} {component.version}\n\n"
        f"replace (\n{replaces}\n)\n"
    )


def _restore_symlinks(component: Component, module_dir: Path, src: Path) -> str:
    """A writable copy of the module (under `src`) with its symbolic links put back."""
    copy = src / "upstream"
    shutil.copytree(module_dir, copy)
    for path in copy.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    for link, target in component.symlinks:
        where = copy / link
        if where.exists():
            raise BuildError(
                f"{component.name}: {link} exists in the module; drop it from symlinks"
            )
        where.symlink_to(target)
    return copy.name


def _ldflags(component: Component) -> str:
    flags = ["-s", "-w"]
    if component.version_ldflags:
        major, minor = component.version.lstrip("v").split(".")[:2]
        pkg = component.version_ldflags
        flags += [
            f"-X {pkg}.gitVersion={component.version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return " ".join(flags)


def _build(component: Component, dest: Path) -> None:
    work = dest.with_name(dest.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    src.mkdir(parents=True)
    (src / "go.mod").write_text(f"module psft.test/probe/{component.name}\n\ngo 1.24\n")
    info = _download(component, src)
    if "Error" in info:
        raise BuildError(
            f"{component.name}: {component.module}@{component.version}: {info['Error']}"
        )
    local_copy = (
        _restore_symlinks(component, Path(info["Dir"]), src) if component.symlinks else None
    )
    _write_wrapper(component, src, Path(info["GoMod"]).read_text(), local_copy)
    _go(["get", f"{component.module}@{component.version}"], src, component.name)
    bin_dir = work / "bin"
    bin_dir.mkdir()
    for package in component.packages:
        target = component.module if package == "." else f"{component.module}/{package}"
        out = str(bin_dir / component.binary) if component.binary else f"{bin_dir}{os.sep}"
        _go(
            ["build", "-trimpath", "-ldflags", _ldflags(component), "-o", out, target],
            src,
            component.name,
        )
    if component.crds:
        shutil.copytree(Path(info["Dir"]) / component.crds, work / "crds")
        for path in (work / "crds").rglob("*"):
            path.chmod(0o644 if path.is_file() else 0o755)
    shutil.rmtree(src)
    (work / ".complete").write_text(
        json.dumps({"module": component.module, "version": component.version})
    )
    if dest.exists():
        shutil.rmtree(dest)
    work.rename(dest)


def ensure_built(name: str, components: dict[str, Component] | None = None) -> Path:
    """The folder holding ``bin/`` (and ``crds/``) of one component, built on first use."""
    component = (components or load_components())[name]
    dest = component_dir(component)
    if (dest / ".complete").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{component.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / ".complete").is_file():
            _build(component, dest)
    return dest


def main(argv: list[str]) -> int:
    components = load_components()
    names = argv or list(components)
    total = time.monotonic()
    for name in names:
        started = time.monotonic()
        cached = (component_dir(components[name]) / ".complete").is_file()
        try:
            path = ensure_built(name, components)
        except BuildError as exc:
            print(f"cluster build: {exc}", file=sys.stderr)
            return 1
        state = "cached" if cached else "built"
        seconds = time.monotonic() - started
        print(f"cluster build: {name} {components[name].version} {state} in {seconds:.0f} s")
        print(f"  -> {path}")
    print(f"cluster build: total {time.monotonic() - total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
