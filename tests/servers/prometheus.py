"""Real Prometheus and Pushgateway for tests (Debian packages), on free 127.0.0.1 ports.

The binaries are found on PATH, or installed with apt-get when the tests run as root on a
Debian/Ubuntu machine (CI): `apt-get install prometheus prometheus-pushgateway`. Data
lives in a temp folder. Stage endpoints are added while Prometheus runs (file-based
service discovery), and everything is scraped every second with `honor_labels: true`,
so our `job` label (the PSFTJob's name) survives the scrape.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from servers.seaweed import free_ports

PACKAGES = ("prometheus", "prometheus-pushgateway")
PUSHGATEWAY_NAMES = ("prometheus-pushgateway", "pushgateway")


class ToolMissing(RuntimeError):
    pass


def _find(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        if Path(f"/usr/bin/{name}").is_file():  # PATH without /usr/bin
            return f"/usr/bin/{name}"
    return None


def ensure_binaries() -> tuple[str, str]:
    """(prometheus, pushgateway) paths; installs the Debian packages if allowed."""
    prom, gateway = _find(("prometheus",)), _find(PUSHGATEWAY_NAMES)
    if prom and gateway:
        return prom, gateway
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ToolMissing(
            "prometheus / prometheus-pushgateway not found; install them: "
            "apt-get install prometheus prometheus-pushgateway"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        check=True,
        env=env,
        timeout=900,
    )
    prom, gateway = _find(("prometheus",)), _find(PUSHGATEWAY_NAMES)
    if not (prom and gateway):
        raise ToolMissing("apt-get installed prometheus but its binaries are not on PATH")
    return prom, gateway


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


class PrometheusStack:
    """Prometheus scraping stage endpoints and a Pushgateway every second."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.prom_port, self.gateway_port = free_ports(2)
        self.targets_file = self.root / "targets.json"
        self.procs: list[subprocess.Popen[bytes]] = []
        self._targets: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    @property
    def pushgateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def start(self, timeout: float = 60.0) -> PrometheusStack:
        prom, gateway = ensure_binaries()
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_targets()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": [
                {
                    "job_name": "psft-stages",
                    "honor_labels": True,
                    "file_sd_configs": [
                        {"files": [str(self.targets_file)], "refresh_interval": "1s"}
                    ],
                },
                {
                    "job_name": "pushgateway",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{self.gateway_port}"]}],
                },
            ],
        }
        config_file = self.root / "prometheus.yml"
        config_file.write_text(json.dumps(config))  # JSON is YAML
        self._spawn(
            "pushgateway",
            [
                gateway,
                f"--web.listen-address=127.0.0.1:{self.gateway_port}",
                f"--persistence.file={self.root / 'pushgateway.data'}",
                "--persistence.interval=1s",
                "--log.level=warn",
            ],
        )
        self._spawn(
            "prometheus",
            [
                prom,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={self.root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.prom_port}",
                "--log.level=warn",
            ],
        )
        self._wait_ready(f"{self.pushgateway_url}/-/ready", timeout)
        self._wait_ready(f"{self.url}/-/ready", timeout)
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.procs.append(
            subprocess.Popen(argv, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        )
        log.close()

    def _wait_ready(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}: {self.logs()}")
            try:
                _get(url, timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{url} not ready after {timeout}s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)
        self.procs.clear()

    # targets and queries --------------------------------------------------------------------
    def _write_targets(self) -> None:
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": self._targets, "labels": {}}]))
        os.replace(tmp, self.targets_file)

    def add_target(self, host_port: str) -> None:
        """Scrape a stage's /metrics endpoint from now on."""
        self._targets.append(host_port)
        self._write_targets()

    def remove_target(self, host_port: str) -> None:
        self._targets.remove(host_port)
        self._write_targets()

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        body = json.loads(_get(f"{self.url}/api/v1/{path}?{query}"))
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus API {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: [{metric: {labels}, value: [ts, "v"]}, ...]."""
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, want: float | None = None, timeout: float = 30.0) -> float:
        """Value of a single-series query once it exists (and equals `want`, if given)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = self.query(expr)
            if len(last) == 1:
                value = float(last[0]["value"][1])
                if want is None or value == want:
                    return value
            time.sleep(0.25)
        raise AssertionError(f"{expr}: wanted {want}, Prometheus has {last}")
