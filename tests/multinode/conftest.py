"""Fixtures of the multi-node tests: a real two-node Ray cluster on this machine, and a
real S3 server (SeaweedFS) whose keys every Ray node has in its environment, as the pods
of a RayJob get them from the job's secret."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ray_cluster import LocalRayCluster
from servers.seaweed import SeaweedS3


# module scope (the tests of one module use them): a cluster kept to the end of the session
# would be joined by every later test that runs a multi-node spec (RAY_ADDRESS stays set),
# which then waits for resources that cluster does not have
@pytest.fixture(scope="module")
def multinode_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("multinode-seaweed")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ray_cluster(
    tmp_path_factory: pytest.TempPathFactory, multinode_s3: SeaweedS3
) -> Iterator[LocalRayCluster]:
    """A head and a worker node (one CPU each); drivers join through RAY_ADDRESS."""
    pytest.importorskip("ray")
    cluster = LocalRayCluster(tmp_path_factory.mktemp("ray-cluster"), env=multinode_s3.env())
    cluster.start()
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_ADDRESS", cluster.address)
    try:
        yield cluster
    finally:
        patch.undo()
        cluster.stop()
