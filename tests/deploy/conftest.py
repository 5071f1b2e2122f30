"""Fixtures for the scale-out tests: the compose topology as processes (deploy/topology.py) on loopback,
and a tiny random test_vit backbone (the load driver the tests use is tests/helpers/load.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.topology import Topology, interrupt_on_sigterm
from tests.helpers.api import TOKEN
from tests.helpers.models import MODEL, backbone_file


@pytest.fixture(scope="package", autouse=True)
def _teardown_on_sigterm() -> None:
    # a cancelled CI job (SIGTERM) still runs the fixtures' teardown: no servers are left behind
    interrupt_on_sigterm()


@pytest.fixture(scope="package")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return backbone_file("vit", tmp_path_factory.mktemp("deploy-backbone"))


def open_topology(tmp: Path, weights: Path) -> Topology:
    # reconcile-driven behaviour is what we test: no batching delay, a short drain. The replicas share this
    # host's cores, so each gets one intra-op thread: two 2-thread OpenMP teams on 2 cores stall each other's
    # barriers (measured: replace propagation p99 1.2-2.1 s with torch's default, 0.07-0.09 s with one each)
    env = {
        "SSF_MAX_QUEUE_DELAY_MS": "1",
        "SSF_DRAIN_DELAY_S": "1",
        "SSF_GRACEFUL_TIMEOUT_S": "10",
        "SSF_TORCH_THREADS": "1",
    }
    return Topology(tmp, weights, MODEL, replicas=2, admin_token=TOKEN, replica_env=env)


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> Iterator[Topology]:
    t = open_topology(tmp_path_factory.mktemp("topology"), weights)
    with t:
        yield t
