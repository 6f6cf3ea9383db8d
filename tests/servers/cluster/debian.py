"""Debian packages the real-node tests need, installed with apt-get when missing.

Like tests/servers/prometheus.py: the programs are looked up first; only when one is missing
and the tests run as root on a Debian/Ubuntu machine (CI) does this run `apt-get install`.
Everything else raises `Missing` with the command a person would run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

# program (or file) -> the Debian package that ships it
NODE_PACKAGES = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "/usr/lib/cni/host-local": "containernetworking-plugins",
    "/usr/lib/cni/loopback": "containernetworking-plugins",
}
IMAGE_PACKAGES = {"debootstrap": "debootstrap"}


class Missing(RuntimeError):
    """A prerequisite that cannot be installed here (not root, no apt-get)."""


def find(program: str) -> str | None:
    """An absolute path as it is, else the program on PATH or in the sbin/bin folders
    (a PATH without /usr/sbin is common for non-login shells)."""
    if program.startswith("/"):
        return program if Path(program).exists() else None
    if found := shutil.which(program):
        return found
    for folder in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if (Path(folder) / program).is_file():
            return f"{folder}/{program}"
    return None


def ensure(wanted: dict[str, str]) -> dict[str, str]:
    """{program: path}; apt-get installs the packages of the missing ones first."""
    missing = sorted({pkg for prog, pkg in wanted.items() if not find(prog)})
    if missing:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise Missing(
                f"{', '.join(missing)} not installed and this is not a root Debian machine: "
                f"apt-get install {' '.join(missing)}"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # one apt-get at a time across parallel test processes
        with open("/tmp/.psft-apt.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            still = sorted({pkg for prog, pkg in wanted.items() if not find(prog)})
            if still:
                subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
                subprocess.run(
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *still],
                    check=True,
                    env=env,
                    timeout=900,
                )
    paths = {prog: find(prog) for prog in wanted}
    absent = [prog for prog, path in paths.items() if not path]
    if absent:
        raise Missing(f"installed {missing} but {absent} are still not found")
    return {prog: str(path) for prog, path in paths.items()}
