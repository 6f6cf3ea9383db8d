"""`psft operator` as a process: scope flags, health probe, /metrics, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from operator_harness import NS, Cluster, job_manifest, wait_for

from psft.operator.main import peering, scope
from psft.workflows.cli import main as psft_main
from psft.workflows.errors import UserError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scope_and_peering_arguments():
    assert scope(["a", "b"], False) == {"namespaces": ["a", "b"], "clusterwide": False}
    assert scope(None, True) == {"namespaces": [], "clusterwide": True}
    assert scope(None, False)["clusterwide"] is True
    with pytest.raises(UserError, match="not both"):
        scope(["a"], True)
    assert peering(None, False) == {"standalone": False, "peering_name": "psft-operator"}
    assert peering("team", False)["peering_name"] == "team"
    assert peering("team", True) == {"standalone": True}


def test_conflicting_scope_is_a_user_error(capsys):
    assert psft_main(["operator", "--namespace", "a", "--all-namespaces"]) == 2
    assert "either --namespace or --all-namespaces" in capsys.readouterr().err


@pytest.mark.integration
def test_psft_operator_process(kubeconfig, api):
    metrics_port, health_port = _free_port(), _free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PSFT_LOG_LEVEL": "DEBUG"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    argv = [sys.executable, "-m", "psft.workflows.cli", "operator", "--namespace", NS]
    argv += ["--standalone", "--metrics-port", str(metrics_port)]
    argv += ["--health-port", str(health_port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode())
            try:
                url = f"http://127.0.0.1:{health_port}/healthz"
                return urllib.request.urlopen(url, timeout=1).status == 200
            except OSError:
                return False

        wait_for(healthy, timeout=30, what="the liveness probe")
        cluster = Cluster(api)
        cluster.create_job(job_manifest("proc"))
        # generous timeouts: a fresh process on a busy CI machine (they return when met)
        wait_for(lambda: cluster.workflow("psft-proc"), timeout=60, what="the Workflow")
        cluster.wait_phase("proc", "Pending", timeout=60)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        scraped = wait_for(
            lambda: (
                (t := urllib.request.urlopen(url).read().decode())
                and 'psft_jobs{phase="Pending"} 1.0' in t
                and t
            ),
            timeout=60,
        )
        assert 'psft_reconcile_total{result="ok"}' in scraped
        assert "psft_reconcile_seconds_bucket" in scraped
    except AssertionError as exc:
        proc.kill()
        output = proc.communicate()[0].decode(errors="replace")[-4000:]
        raise AssertionError(f"{exc}\n--- operator output ---\n{output}") from None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    output = proc.stdout.read().decode(errors="replace")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{output[-4000:]}"
    assert "created Workflow psft-proc" in output
