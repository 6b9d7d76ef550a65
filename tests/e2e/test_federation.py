"""Peers join and leave a federation of three real clusters, each with its own real operator;
no cluster is special and losing one does not stop the others."""

import base64
import functools
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from edgellm.api import GROUP, VERSION
from edgellm.dev.cluster import LocalCluster
from edgellm.dev.federation import LocalFederation
from edgellm.federation.membership import Endpoint, JoinToken, token_kubeconfig
from edgellm.kube import api_client
from edgellm.worker.models import BENCH, write_model
from tests.e2e.helpers import OperatorProcess, edgellm, eventually, worker_process

SYNC = 60.0  # seconds within which mirrors must converge


def _peer(cluster: LocalCluster, name: str) -> dict[str, Any] | None:
    with api_client(cluster.kubeconfig("admin")) as api:
        try:
            peer: dict[str, Any] = client.CustomObjectsApi(api).get_cluster_custom_object(
                GROUP, VERSION, "peernodes", name
            )
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise
    return peer


def _condition(peer: dict[str, Any] | None, type_: str) -> str | None:
    for condition in (peer or {}).get("status", {}).get("conditions", []):
        if condition["type"] == type_:
            return str(condition["status"])
    return None


def _reachable_is(name: str, status: str, cluster: LocalCluster) -> bool:
    return _condition(_peer(cluster, name), "Reachable") == status


def _everywhere(federation: LocalFederation, check: Any) -> bool:
    return all(check(cluster) for cluster in federation.clusters)


def _until_everywhere(federation: LocalFederation, name: str, type_: str, status: str) -> None:
    eventually(
        lambda: _everywhere(federation, lambda c: _condition(_peer(c, name), type_) == status),
        SYNC,
        f"{name} has {type_}={status} in every cluster",
    )


def _until_gone_everywhere(federation: LocalFederation, name: str) -> None:
    eventually(
        lambda: _everywhere(federation, lambda c: _peer(c, name) is None),
        SYNC,
        f"{name} is gone from every cluster",
    )


def _members(cluster: LocalCluster) -> set[str]:
    with api_client(cluster.kubeconfig("admin")) as api:
        items = client.CustomObjectsApi(api).list_cluster_custom_object(
            GROUP, VERSION, "federationmembers"
        )["items"]
    return {m["metadata"]["name"] for m in items}


@pytest.fixture
def peer_process(
    cluster_kubeconfigs: dict[str, Path],
) -> Iterator[Any]:
    """Starts `edgellm join` processes (heartbeating peers); kills them at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(
        cluster: str,
        name: str,
        ttl: int = 5,
        endpoint: str = "http://127.0.0.1:8600",
        models_dir: Path | None = None,
    ) -> subprocess.Popen[str]:
        models = [f"--models-dir={models_dir}"] if models_dir else []
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgellm",
                "join",
                f"--kubeconfig={cluster_kubeconfigs[cluster]}",
                f"--name={name}",
                f"--endpoint={endpoint}",
                f"--heartbeat-ttl={ttl}",
                *models,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_membership_spreads_to_every_member(joined: LocalFederation) -> None:
    names = {c.name for c in joined.clusters}
    for cluster in joined.clusters:
        eventually(
            functools.partial(lambda c: _members(c) == names - {c.name}, cluster),
            SYNC,
            f"{cluster.name} knows every other member",
        )


def test_a_joined_peer_is_ready_in_every_cluster(
    joined: LocalFederation, peer_process: Any
) -> None:
    peer_process("edge-2", "edge-2-laptop")
    _until_everywhere(joined, "edge-2-laptop", "Ready", "True")
    mirror = _peer(joined.clusters[0], "edge-2-laptop")
    assert mirror is not None
    assert mirror["metadata"]["labels"]["edgellm.io/origin-cluster"] == "edge-2"
    assert mirror["spec"]["cluster"] == "edge-2"


def test_labelled_nodes_become_peers_seen_everywhere(joined: LocalFederation) -> None:
    _until_everywhere(joined, "edge-1-gpu-0", "Ready", "True")
    peer = _peer(joined.clusters[2], "edge-1-gpu-0")
    assert peer is not None
    accelerators = peer["spec"]["resources"]["accelerators"]
    assert accelerators == [
        {"vendor": "nvidia", "model": "NVIDIA-GeForce-RTX-4090", "memory": "24564Mi", "count": 1}
    ]
    assert "vllm" in peer["spec"]["backends"]


@pytest.fixture(scope="module")
def slow_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A worker serving the bench model, slow enough on a CPU that a request stays in flight
    for a while; yields its URL and its models directory."""
    models = tmp_path_factory.mktemp("models")
    with worker_process(write_model(models / "bench-random.gguf", BENCH)) as worker:
        yield worker.url, models


def _request_phase(cluster: LocalCluster, name: str) -> str | None:
    with api_client(cluster.kubeconfig("admin")) as api:
        body = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, "default", "inferencerequests", name
        )
    phase: str | None = body.get("status", {}).get("phase")
    return phase


def test_leave_waits_for_a_request_in_flight_then_removes_the_peer_everywhere(
    joined: LocalFederation,
    peer_process: Any,
    cluster_kubeconfigs: dict[str, Path],
    slow_worker: tuple[str, Path],
) -> None:
    url, models = slow_worker
    peer_process("edge-3", "edge-3-desktop", ttl=30, endpoint=url, models_dir=models)
    _until_everywhere(joined, "edge-3-desktop", "Ready", "True")
    edge3 = joined.clusters[2]
    request = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceRequest",
        "metadata": {"name": "in-flight", "namespace": "default"},
        "spec": {
            "model": "bench-random",
            "prompt": "hello",
            "sampling": {"maxTokens": 2000, "temperature": 0},
        },
    }
    with api_client(edge3.kubeconfig("admin")) as api:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, "default", "inferencerequests", request
        )
    eventually(lambda: _request_phase(edge3, "in-flight") == "Running", SYNC, "the request runs")
    leaving = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgellm",
            "leave",
            f"--kubeconfig={cluster_kubeconfigs['edge-3']}",
            "--name=edge-3-desktop",
            "--deadline=300",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _until_everywhere(joined, "edge-3-desktop", "Draining", "True")
    assert _request_phase(edge3, "in-flight") == "Running"
    assert leaving.poll() is None, "leave must wait for the request in flight"
    out, err = leaving.communicate(timeout=300)
    assert leaving.returncode == 0, err
    assert "no request was cut short" in out
    assert _request_phase(edge3, "in-flight") == "Succeeded"
    _until_gone_everywhere(joined, "edge-3-desktop")


def test_a_peer_whose_heartbeat_stops_goes_not_ready_then_is_removed_everywhere(
    joined: LocalFederation, peer_process: Any
) -> None:
    process = peer_process("edge-1", "edge-1-crashy", ttl=5)
    _until_everywhere(joined, "edge-1-crashy", "Ready", "True")
    process.send_signal(signal.SIGKILL)
    process.wait()
    _until_everywhere(joined, "edge-1-crashy", "Ready", "False")
    expired = _peer(joined.clusters[0], "edge-1-crashy")
    reasons = {c["type"]: c["reason"] for c in expired["status"]["conditions"]} if expired else {}
    assert reasons.get("Ready") == "HeartbeatExpired"
    _until_gone_everywhere(joined, "edge-1-crashy")


def test_a_cluster_whose_apiserver_stops_is_routed_around_and_heals(
    joined: LocalFederation, peer_process: Any
) -> None:
    edge1, edge2, edge3 = joined.clusters
    peer_process("edge-3", "edge-3-server", ttl=30)
    _until_everywhere(joined, "edge-3-server", "Ready", "True")
    edge3.stop_component("kube-apiserver")
    try:
        for cluster in (edge1, edge2):
            eventually(
                functools.partial(_reachable_is, "edge-3-server", "False", cluster),
                SYNC,
                f"{cluster.name} marks edge-3's peer unreachable",
            )
        # The other two keep admitting, scheduling and mirroring.
        with api_client(edge1.kubeconfig("admin")) as api:
            peer = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "PeerNode",
                "metadata": {"name": "edge-1-newcomer"},
                "spec": {
                    "cluster": "edge-1",
                    "endpoint": "http://127.0.0.1:8601",
                    "roles": ["decode"],
                    "backends": ["llamacpp"],
                    "resources": {"cpu": 2, "memory": "4Gi"},
                },
            }
            client.CustomObjectsApi(api).create_cluster_custom_object(
                GROUP, VERSION, "peernodes", peer
            )
            client.AppsV1Api(api).create_namespaced_deployment(
                "default",
                {
                    "metadata": {"name": "during-partition"},
                    "spec": {
                        "replicas": 2,
                        "selector": {"matchLabels": {"app": "during-partition"}},
                        "template": {
                            "metadata": {"labels": {"app": "during-partition"}},
                            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
                        },
                    },
                },
            )
        eventually(
            lambda: _peer(edge2, "edge-1-newcomer"), SYNC, "edge-2 still receives edge-1's mirrors"
        )

        def scheduled() -> bool:
            with api_client(edge1.kubeconfig("admin")) as api:
                pods = (
                    client.CoreV1Api(api)
                    .list_namespaced_pod("default", label_selector="app=during-partition")
                    .items
                )
            return len(pods) == 2 and all(p.spec.node_name for p in pods)

        eventually(scheduled, SYNC, "edge-1 still schedules pods onto its nodes")
    finally:
        edge3.start_component("kube-apiserver")
    for cluster in (edge1, edge2):
        eventually(
            functools.partial(_reachable_is, "edge-3-server", "True", cluster),
            SYNC,
            f"{cluster.name} sees edge-3's peer reachable again",
        )
    eventually(
        lambda: _peer(edge3, "edge-1-newcomer"), SYNC, "edge-3 catches up with edge-1's new peer"
    )


def test_a_wrong_or_revoked_join_token_is_refused_and_creates_nothing(
    joined: LocalFederation, cluster_kubeconfigs: dict[str, Path]
) -> None:
    created = edgellm(
        "federation", "token", "create", f"--kubeconfig={cluster_kubeconfigs['edge-1']}"
    )
    assert created.returncode == 0, created.stderr
    token = JoinToken.decode(created.stdout.strip())
    wrong = token.model_copy(update={"token": token.token[:-4] + "AAAA"}).encode()
    token_id = created.stderr.split()[2].rstrip(",")

    def accounts() -> set[str]:
        with api_client(joined.clusters[1].kubeconfig("admin")) as api:
            items = (
                client.CoreV1Api(api).list_namespaced_service_account("edgellm-federation").items
            )
        return {a.metadata.name for a in items}

    before = accounts(), _members(joined.clusters[1])
    refused = edgellm("federation", "join", wrong, f"--kubeconfig={cluster_kubeconfigs['edge-2']}")
    assert refused.returncode == 1
    assert "edge-1 refused the join token: it is wrong, expired or revoked" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    revoked = edgellm(
        "federation", "token", "revoke", token_id, f"--kubeconfig={cluster_kubeconfigs['edge-1']}"
    )
    assert revoked.returncode == 0, revoked.stderr
    refused = edgellm(
        "federation", "join", token.encode(), f"--kubeconfig={cluster_kubeconfigs['edge-2']}"
    )
    assert refused.returncode == 1
    assert "refused the join token" in refused.stderr
    damaged = edgellm(
        "federation", "join", "edgellm-join-v1.!!!", f"--kubeconfig={cluster_kubeconfigs['edge-2']}"
    )
    assert damaged.returncode == 1
    assert "the join token is damaged" in damaged.stderr
    assert (accounts(), _members(joined.clusters[1])) == before, "nothing was created"


def test_a_member_credential_is_scoped(joined: LocalFederation) -> None:
    edge2 = joined.clusters[1]
    # edge-1's credential for edge-2 mirrors peers there, but reads no secret, deletes nothing else.
    with api_client(_as_member(joined, "edge-1", edge2)) as api:
        client.CustomObjectsApi(api).list_cluster_custom_object(GROUP, VERSION, "peernodes")
        core = client.CoreV1Api(api)
        with pytest.raises(client.ApiException) as reading:
            core.list_namespaced_secret("edgellm-federation")
        with pytest.raises(client.ApiException) as deleting:
            core.delete_namespace("default")
    assert (reading.value.status, deleting.value.status) == (403, 403)


def test_an_operator_restarted_mid_sync_duplicates_and_loses_no_mirror(
    joined: LocalFederation, operators: dict[str, OperatorProcess]
) -> None:
    edge1 = joined.clusters[0]
    names = [f"edge-1-batch-{i}" for i in range(30)]
    with api_client(edge1.kubeconfig("admin")) as api:
        objects = client.CustomObjectsApi(api)
        for name in names:
            objects.create_cluster_custom_object(
                GROUP,
                VERSION,
                "peernodes",
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "PeerNode",
                    "metadata": {"name": name},
                    "spec": {
                        "cluster": "edge-1",
                        "endpoint": "http://127.0.0.1:8602",
                        "roles": ["prefill"],
                        "backends": ["llamacpp"],
                        "resources": {"cpu": 1, "memory": "1Gi"},
                        "heartbeatTTLSeconds": 3600,
                    },
                },
            )
    eventually(
        lambda: _peer(joined.clusters[1], names[0]) or _peer(joined.clusters[2], names[0]),
        SYNC,
        "the sync of the batch has begun",
    )
    operators["edge-1"].kill()
    operators["edge-1"].start()

    def origin_edge1(cluster: LocalCluster) -> list[str]:
        with api_client(cluster.kubeconfig("admin")) as api:
            items = client.CustomObjectsApi(api).list_cluster_custom_object(
                GROUP, VERSION, "peernodes", label_selector="edgellm.io/origin-cluster=edge-1"
            )["items"]
        return sorted(
            i["metadata"]["name"]
            for i in items
            if i["metadata"]["name"].startswith("edge-1-batch-")
        )

    for cluster in joined.clusters[1:]:
        eventually(
            functools.partial(lambda c: origin_edge1(c) == sorted(names), cluster),
            SYNC,
            f"{cluster.name} holds exactly the 30 mirrors",
        )


def test_the_operator_exports_peers_by_cluster_and_state(
    joined: LocalFederation, operators: dict[str, OperatorProcess]
) -> None:
    url = f"http://127.0.0.1:{operators['edge-2'].metrics_port}/metrics"

    def ready_edge1_peers() -> float:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith('edgellm_operator_peers{cluster="edge-1",state="ready"}'):
                return float(line.split()[-1])
        return 0.0

    assert eventually(ready_edge1_peers, SYNC, "edge-2's operator counts edge-1's ready peers") >= 3


def _as_member(joined: LocalFederation, member: str, target: LocalCluster) -> dict[str, Any]:
    """A kubeconfig for `target` with the credential `member` holds for it."""
    holder = next(c for c in joined.clusters if c.name == member)
    with api_client(holder.kubeconfig("admin")) as api:
        secret = client.CoreV1Api(api).read_namespaced_secret(
            f"credentials-{target.name}", "edgellm-federation"
        )
    token = base64.b64decode(secret.data["token"]).decode()
    ca_bundle = base64.b64encode((target.pki_dir / "ca.crt").read_bytes()).decode()
    return token_kubeconfig(
        Endpoint(cluster=target.name, server=target.server, ca_bundle=ca_bundle), token
    )


def test_mirrors_are_read_only_outside_their_own_cluster(joined: LocalFederation) -> None:
    edge1 = joined.clusters[0]
    _until_everywhere(joined, "edge-2-cpu-0", "Ready", "True")
    with api_client(edge1.kubeconfig("admin")) as api, pytest.raises(client.ApiException) as edit:
        client.CustomObjectsApi(api).patch_cluster_custom_object(
            GROUP, VERSION, "peernodes", "edge-2-cpu-0", {"spec": {"unschedulable": True}}
        )
    assert "read-only mirror of a peer of edge-2: change it in that cluster" in edit.value.body
    forged = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PeerNode",
        "metadata": {"name": "edge-3-forged"},
        "spec": {
            "cluster": "edge-3",
            "endpoint": "http://127.0.0.1:8603",
            "roles": ["decode"],
            "backends": ["llamacpp"],
            "resources": {"cpu": 1, "memory": "1Gi"},
        },
    }
    with (
        api_client(_as_member(joined, "edge-2", edge1)) as api,
        pytest.raises(client.ApiException) as forge,
    ):
        client.CustomObjectsApi(api).create_cluster_custom_object(
            GROUP, VERSION, "peernodes", forged
        )
    assert (
        "member edge-2 may only write mirrors of its own peers, not of edge-3" in forge.value.body
    )
