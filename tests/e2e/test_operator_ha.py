"""Operator high availability: real `edgellm operator` processes in one kopf peering on a real
cluster of their own (no standalone operator beside them). One works, kopf's handlers (request
daemons) and the operator's own loops (peer health) alike, while the other stands by; when the
working one is killed, the other takes over within the peering's lifetime, and when it shuts
down, at once.

Which process did the work is read from each one's /metrics: the requests it finished, its
peer-health passes, and `edgellm_operator_leading`.
"""

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from edgellm.api import GROUP, VERSION
from edgellm.dev.cluster import LocalCluster
from edgellm.dev.federation import LocalFederation
from edgellm.kube import api_client
from edgellm.operator.leadership import PEERINGS
from tests.e2e.helpers import (
    OperatorProcess,
    create_fresh_peer,
    eventually,
    manifest,
    peer_ready,
    prepare_cluster,
)

PEERING_CRD = (
    Path(__file__).resolve().parents[2] / "charts/edgellm/crds/clusterkopfpeerings.kopf.dev.yaml"
)
WAIT = 120.0
LEADING = "edgellm_operator_leading"
FINISHED = "edgellm_operator_inference_requests_total"
HEALTH_PASSES = "edgellm_operator_reconcile_duration_seconds_count"
HEARTBEAT = "edgellm_operator_peer_last_heartbeat_timestamp_seconds"

StartReplica = Callable[[str, int], OperatorProcess]


@pytest.fixture(scope="module")
def ha_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    federation = LocalFederation(tmp_path_factory.mktemp("ha-cluster"))
    federation.up(1, progress=lambda line: None)
    try:
        (cluster,) = federation.clusters
        prepare_cluster(cluster, yaml.safe_load(PEERING_CRD.read_text()))
        yield cluster
    finally:
        federation.down()


@pytest.fixture
def objects(ha_cluster: LocalCluster) -> Iterator[client.CustomObjectsApi]:
    with api_client(ha_cluster.kubeconfig("admin")) as api:
        yield client.CustomObjectsApi(api)


@pytest.fixture
def start_replica(ha_cluster: LocalCluster, tmp_path: Path) -> Iterator[StartReplica]:
    """Starts `edgellm operator` replicas in a peering, with a given lifetime; stops them all at
    the end and shows the end of their logs (pytest prints it when the test failed)."""
    kubeconfig = tmp_path / "operator-kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(ha_cluster.kubeconfig("operator")))
    started: list[OperatorProcess] = []

    def start(peering: str, lifetime: int) -> OperatorProcess:
        operator = OperatorProcess(
            ha_cluster.name,
            kubeconfig,
            tmp_path / f"operator-{len(started)}.log",
            options=(f"--peering={peering}", f"--peering-lifetime={lifetime}"),
        )
        operator.start()
        started.append(operator)
        return operator

    yield start
    for operator in started:
        operator.stop()
        print(f"--- {operator.log.name} ---\n{operator.log.read_text(errors='replace')[-3000:]}")


def _identity(operator: OperatorProcess) -> str:
    """The operator's key in the peering: its host and process id."""
    assert operator.process is not None
    return f"{socket.gethostname()}/{operator.process.pid}"


def _metric(operator: OperatorProcess, sample: str, **labels: str) -> float | None:
    """A sample of the operator's /metrics; None while it does not answer or has no such one."""
    try:
        text = httpx.get(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and found.labels == labels:
                return float(found.value)
    return None


def _create_peering(objects: client.CustomObjectsApi, name: str) -> None:
    body = {
        "apiVersion": f"{PEERINGS.group}/{PEERINGS.version}",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": name},
    }
    objects.create_cluster_custom_object(PEERINGS.group, PEERINGS.version, PEERINGS.plural, body)


def _records(objects: client.CustomObjectsApi, peering: str) -> dict[str, Any]:
    body = objects.get_cluster_custom_object(
        PEERINGS.group, PEERINGS.version, PEERINGS.plural, peering
    )
    return dict(body.get("status") or {})


def _request_fails(objects: client.CustomObjectsApi, name: str) -> None:
    """Creates a request for a model no peer holds and waits until an operator failed it."""
    spec = {"model": "no-such-model", "prompt": "which operator works?"}
    objects.create_namespaced_custom_object(
        GROUP, VERSION, "default", "inferencerequests", manifest("InferenceRequest", spec, name)
    )

    def reason() -> str | None:
        body = objects.get_namespaced_custom_object(
            GROUP, VERSION, "default", "inferencerequests", name
        )
        status = body.get("status") or {}
        complete = [c for c in status.get("conditions", []) if c["type"] == "Complete"]
        return complete[0]["reason"] if status.get("phase") == "Failed" and complete else None

    assert eventually(reason, WAIT, f"an operator fails {name}") == "UnknownModel"


def _create_ready_peer(objects: client.CustomObjectsApi, cluster: LocalCluster, name: str) -> None:
    """A PeerNode with one heartbeat that keeps it fresh for an hour: the operator that works
    makes it Ready, in its peer-health loop."""
    spec = {
        "cluster": cluster.name,
        "endpoint": "http://127.0.0.1:1",
        "roles": ["decode"],
        "backends": ["llamacpp"],
        "resources": {"cpu": 1, "memory": "1Gi"},
        "heartbeatTTLSeconds": 3600,
    }
    create_fresh_peer(objects, name, spec)
    kubeconfig = cluster.kubeconfig("admin")
    eventually(lambda: peer_ready(kubeconfig, name), WAIT, f"the peer {name} is Ready")


def _both_keep_records(
    objects: client.CustomObjectsApi, peering: str, first: OperatorProcess, second: OperatorProcess
) -> dict[str, Any]:
    wanted = {_identity(first), _identity(second)}

    def records() -> dict[str, Any] | None:
        found = _records(objects, peering)
        return found if found.keys() == wanted else None

    return eventually(records, WAIT, "both replicas keep a record in the peering")


def test_one_replica_works_and_the_other_takes_over_when_it_is_killed(
    objects: client.CustomObjectsApi, ha_cluster: LocalCluster, start_replica: StartReplica
) -> None:
    _create_peering(objects, "ha-killed")
    first = start_replica("ha-killed", 5)
    eventually(lambda: _metric(first, LEADING) == 1, WAIT, "the first replica leads")
    second = start_replica("ha-killed", 5)
    records = _both_keep_records(objects, "ha-killed", first, second)
    # The one started first has the higher priority: a newcomer does not take over.
    assert records[_identity(first)]["priority"] > records[_identity(second)]["priority"]
    assert records[_identity(second)]["lifetime"] == 5

    _request_fails(objects, "ha-before-kill")
    _create_ready_peer(objects, ha_cluster, "ha-peer")
    # Only the first did either: the second's request daemons and health loop never ran.
    assert _metric(first, FINISHED, phase="Failed") == 1
    assert _metric(second, FINISHED, phase="Failed") is None
    assert (_metric(first, HEALTH_PASSES, controller="peer-health") or 0) > 0
    assert _metric(second, HEALTH_PASSES, controller="peer-health") is None
    assert (_metric(first, LEADING), _metric(second, LEADING)) == (1, 0)

    first.kill()  # SIGKILL: no goodbye; its record expires after its 5-second lifetime
    eventually(lambda: _metric(second, LEADING) == 1, WAIT, "the second replica takes over")
    eventually(
        lambda: _identity(first) not in _records(objects, "ha-killed"),
        WAIT,
        "the killed replica's expired record is cleaned from the peering",
    )
    _request_fails(objects, "ha-after-kill")
    assert _metric(second, FINISHED, phase="Failed") == 1
    # Its own loops run too, with a fresh view of the peers.
    eventually(
        lambda: _metric(second, HEARTBEAT, cluster=ha_cluster.name, peer="ha-peer"),
        WAIT,
        "the second replica's health loop reports the peer's heartbeat",
    )


def test_a_replica_that_shuts_down_hands_over_at_once(
    objects: client.CustomObjectsApi, start_replica: StartReplica
) -> None:
    # A lifetime far beyond the wait below: only the first's goodbye can hand over in time.
    lifetime = 600
    _create_peering(objects, "ha-stopped")
    first = start_replica("ha-stopped", lifetime)
    eventually(lambda: _metric(first, LEADING) == 1, WAIT, "the first replica leads")
    second = start_replica("ha-stopped", lifetime)
    _both_keep_records(objects, "ha-stopped", first, second)
    assert _metric(second, LEADING) == 0

    first.stop()  # SIGTERM: kopf removes its record on the way out
    assert first.process is not None
    assert first.process.returncode == 0
    assert _identity(first) not in _records(objects, "ha-stopped")
    eventually(lambda: _metric(second, LEADING) == 1, WAIT, "the second replica takes over")
    _request_fails(objects, "ha-after-stop")
    assert _metric(second, FINISHED, phase="Failed") == 1
