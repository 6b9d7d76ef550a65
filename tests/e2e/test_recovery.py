"""Requests survive what goes wrong mid-generation: a worker killed, the operator restarted; and
a deleted request stops its worker. Real operators, real llama.cpp workers with the bench model
(slow enough on a CPU that a long generation is caught in flight)."""

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from edgellm.api import GROUP, VERSION
from edgellm.dev.federation import LocalFederation
from edgellm.kube import api_client
from edgellm.worker.models import BENCH, write_model
from tests.e2e.helpers import (
    OperatorProcess,
    ServingPeer,
    eventually,
    output_text,
    peer_ready,
    request_events,
    serving_peer,
)

DONE = 300.0
LONG = {"maxTokens": 2500, "temperature": 0, "ignoreEos": True}
_names = itertools.count()


@dataclass
class Peers:
    local: ServingPeer  # in edge-1, where the requests are made
    remote: ServingPeer  # in edge-2, seen by edge-1's operator through its mirror

    def by_name(self, name: str) -> ServingPeer:
        return self.local if name == self.local.name else self.remote


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "bench-random.gguf", BENCH)


@pytest.fixture
def peers(
    joined: LocalFederation,
    operators: dict[str, OperatorProcess],
    cluster_kubeconfigs: dict[str, Path],
    bench_model: Path,
) -> Iterator[Peers]:
    """Two fresh bench-model peers per test, one per cluster, both Ready in edge-1."""
    n = next(_names)
    with (
        serving_peer(cluster_kubeconfigs["edge-1"], f"edge-1-bench-{n}", bench_model) as local,
        serving_peer(cluster_kubeconfigs["edge-2"], f"edge-2-bench-{n}", bench_model) as remote,
    ):
        eventually(
            lambda: peer_ready(joined.clusters[0].kubeconfig("admin"), remote.name),
            60,
            "edge-1 sees the remote peer Ready",
        )
        yield Peers(local, remote)


@contextmanager
def _objects(joined: LocalFederation) -> Iterator[client.CustomObjectsApi]:
    with api_client(joined.clusters[0].kubeconfig("admin")) as api:
        yield client.CustomObjectsApi(api)


def _submit(joined: LocalFederation, name: str) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceRequest",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"model": "bench-random", "prompt": "hello", "sampling": LONG},
    }
    with _objects(joined) as objects:
        objects.create_namespaced_custom_object(
            GROUP, VERSION, "default", "inferencerequests", body
        )


def _status(joined: LocalFederation, name: str) -> dict[str, Any] | None:
    with _objects(joined) as objects:
        try:
            body = objects.get_namespaced_custom_object(
                GROUP, VERSION, "default", "inferencerequests", name
            )
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise
    status: dict[str, Any] = body.get("status", {})
    return status


def _generating(joined: LocalFederation, name: str, tokens: int = 50) -> dict[str, Any]:
    """The status once the request is Running and its output so far has `tokens`."""

    def check() -> dict[str, Any] | None:
        status = _status(joined, name) or {}
        done = (status.get("output") or {}).get("completionTokens", 0)
        return status if status.get("phase") == "Running" and done >= tokens else None

    return eventually(check, DONE, f"{name} has generated {tokens} tokens")


def _finished(joined: LocalFederation, name: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        status = _status(joined, name) or {}
        return status if status.get("phase") in ("Succeeded", "Failed", "Cancelled") else None

    return eventually(check, DONE, f"{name} finishes")


def _text(joined: LocalFederation, status: dict[str, Any]) -> str:
    return output_text(joined.clusters[0].kubeconfig("admin"), "default", status)


def _event_reasons(joined: LocalFederation, name: str) -> list[str]:
    return [e.reason for e in request_events(joined, name)]


def _finished_generations(worker: str, reason: str) -> float:
    """How many generations the worker finished with this finish reason, from its /metrics."""
    metrics = text_string_to_metric_families(httpx.get(f"{worker}/metrics", timeout=5).text)
    return sum(
        sample.value
        for family in metrics
        for sample in family.samples
        if sample.name == "edgellm_worker_requests_total"
        and sample.labels["finish_reason"] == reason
    )


def test_a_worker_killed_mid_decode_resumes_on_another_peer_from_its_tokens(
    joined: LocalFederation, peers: Peers
) -> None:
    _submit(joined, "worker-killed")
    before = _generating(joined, "worker-killed")
    first = peers.by_name(before["assignment"]["decodePeer"])
    first.worker.process.kill()

    status = _finished(joined, "worker-killed")
    assert status["phase"] == "Succeeded", status
    assert status["assignment"]["attempts"] == 2
    assert status["assignment"]["decodePeer"] != first.name
    output = status["output"]
    assert _text(joined, status).startswith(_text(joined, before))
    assert len(_text(joined, status)) > len(_text(joined, before))
    assert output["completionTokens"] == LONG["maxTokens"]
    assert output["finishReason"] == "length"
    reasons = _event_reasons(joined, "worker-killed")
    assert "PeerLost" in reasons
    assert reasons.count("Generated") == 1


def test_an_operator_restarted_mid_request_completes_it_once(
    joined: LocalFederation, peers: Peers, operators: dict[str, OperatorProcess]
) -> None:
    _submit(joined, "operator-restarted")
    before = _generating(joined, "operator-restarted")
    first = peers.by_name(before["assignment"]["decodePeer"])
    operators["edge-1"].kill()
    operators["edge-1"].start()

    status = _finished(joined, "operator-restarted")
    assert status["phase"] == "Succeeded", status
    assert status["assignment"]["attempts"] == 2
    output = status["output"]
    assert _text(joined, status).startswith(_text(joined, before))
    assert output["completionTokens"] == LONG["maxTokens"]
    assert _event_reasons(joined, "operator-restarted").count("Generated") == 1
    # The first attempt stopped when its operator went: one generation ran to the end.
    finished = sum(
        _finished_generations(p.worker.url, "length") for p in (peers.local, peers.remote)
    )
    assert finished == 1
    assert _finished_generations(first.worker.url, "cancelled") == 1


def test_deleting_a_running_request_stops_its_worker(joined: LocalFederation, peers: Peers) -> None:
    _submit(joined, "deleted-mid-run")
    running = _generating(joined, "deleted-mid-run", tokens=20)
    worker = peers.by_name(running["assignment"]["decodePeer"]).worker.url
    with _objects(joined) as objects:
        objects.delete_namespaced_custom_object(
            GROUP, VERSION, "default", "inferencerequests", "deleted-mid-run"
        )

    eventually(
        lambda: _finished_generations(worker, "cancelled") == 1,
        DONE,
        "the worker stops the deleted request's generation",
    )
    assert httpx.get(f"{worker}/healthz", timeout=5).json()["running"] == 0
    assert _finished_generations(worker, "length") == 0
    eventually(lambda: _status(joined, "deleted-mid-run") is None, DONE, "the request is gone")


def test_a_generation_stopped_on_its_worker_cancels_the_request(
    joined: LocalFederation, peers: Peers
) -> None:
    _submit(joined, "stopped-on-worker")
    running = _generating(joined, "stopped-on-worker", tokens=20)
    worker = peers.by_name(running["assignment"]["decodePeer"]).worker.url
    with _objects(joined) as objects:
        uid = objects.get_namespaced_custom_object(
            GROUP, VERSION, "default", "inferencerequests", "stopped-on-worker"
        )["metadata"]["uid"]
    assert httpx.delete(f"{worker}/v1/requests/{uid}-1", timeout=5).status_code == 204

    status = _finished(joined, "stopped-on-worker")
    assert status["phase"] == "Cancelled"
    assert status["output"]["finishReason"] == "cancelled"
    assert status["output"]["completionTokens"] < LONG["maxTokens"]
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["reason"] == "CancelledOnWorker"
    assert "CancelledOnWorker" in _event_reasons(joined, "stopped-on-worker")
