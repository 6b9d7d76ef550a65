"""InferenceRequests end to end: the real operator schedules them onto a real llama.cpp worker
(the generated tiny model) registered as a peer, and writes the answer into the status."""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from edgellm.api import GROUP, VERSION
from edgellm.dev.federation import LocalFederation
from edgellm.kube import api_client
from edgellm.worker.models import TINY, write_model
from tests.e2e.conftest import OperatorProcess, eventually, worker_process

DONE = 120.0


@pytest.fixture(scope="module")
def serving_peer(
    joined: LocalFederation,
    operators: dict[str, OperatorProcess],
    cluster_kubeconfigs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A worker serving tiny-random, joined as the peer edge-1-worker."""
    models = tmp_path_factory.mktemp("models")
    model = write_model(models / "tiny-random.gguf", TINY)
    with worker_process(model) as url:
        peer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgellm",
                "join",
                f"--kubeconfig={cluster_kubeconfigs['edge-1']}",
                "--name=edge-1-worker",
                f"--endpoint={url}",
                f"--models-dir={models}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def ready() -> bool:
            body = _get(joined, "peernodes", "edge-1-worker")
            conditions = (body or {}).get("status", {}).get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        try:
            eventually(ready, DONE, "the worker's peer is Ready")
            yield "edge-1-worker"
        finally:
            peer.terminate()
            peer.wait(timeout=30)


def _get(joined: LocalFederation, plural: str, name: str) -> dict[str, Any] | None:
    with api_client(joined.clusters[0].kubeconfig("admin")) as api:
        objects = client.CustomObjectsApi(api)
        try:
            if plural == "peernodes":
                found: dict[str, Any] = objects.get_cluster_custom_object(
                    GROUP, VERSION, plural, name
                )
            else:
                found = objects.get_namespaced_custom_object(
                    GROUP, VERSION, "default", plural, name
                )
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise
    return found


def _submit(joined: LocalFederation, name: str, **spec: Any) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceRequest",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": "tiny-random",
            "messages": [{"role": "user", "content": "Hello there"}],
            **spec,
        },
    }
    with api_client(joined.clusters[0].kubeconfig("admin")) as api:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, "default", "inferencerequests", body
        )


def _finished(joined: LocalFederation, name: str) -> dict[str, Any]:
    def phase() -> dict[str, Any] | None:
        body = _get(joined, "inferencerequests", name)
        status = (body or {}).get("status", {})
        return status if status.get("phase") in ("Succeeded", "Failed", "Cancelled") else None

    return eventually(phase, DONE, f"{name} finishes")


def _events(joined: LocalFederation, name: str) -> set[str]:
    with api_client(joined.clusters[0].kubeconfig("admin")) as api:
        items = (
            client.CoreV1Api(api)
            .list_namespaced_event("default", field_selector=f"involvedObject.name={name}")
            .items
        )
    return {e.reason for e in items}


def test_a_request_succeeds_with_text_tokens_and_timings(
    joined: LocalFederation, serving_peer: str
) -> None:
    _submit(joined, "first-answer", sampling={"maxTokens": 24, "temperature": 0})
    status = _finished(joined, "first-answer")
    assert status["phase"] == "Succeeded", status
    assert status["assignment"]["decodePeer"] == serving_peer
    assert status["assignment"]["attempts"] == 1
    output = status["output"]
    assert output["text"]
    assert output["completionTokens"] == 24
    assert output["finishReason"] == "length"
    assert output["promptTokens"] > 5
    timings = status["timings"]
    assert 0 < timings["ttftSeconds"] <= timings["totalSeconds"]
    assert timings["tokensPerSecond"] > 0
    assert {"PeerChosen", "Generating", "Generated"} <= _events(joined, "first-answer")


def test_concurrent_requests_all_succeed(joined: LocalFederation, serving_peer: str) -> None:
    names = [f"concurrent-{i}" for i in range(10)]
    for name in names:
        _submit(joined, name, sampling={"maxTokens": 8})
    phases = [_finished(joined, name)["phase"] for name in names]
    assert phases == ["Succeeded"] * len(names)


def test_an_unknown_model_fails_saying_so(joined: LocalFederation, serving_peer: str) -> None:
    _submit(joined, "unknown-model", model="llama-9000b")
    status = _finished(joined, "unknown-model")
    assert status["phase"] == "Failed"
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["reason"] == "UnknownModel"
    assert "no peer of the federation holds model 'llama-9000b'" in complete["message"]
    assert "UnknownModel" in _events(joined, "unknown-model")


def test_max_tokens_beyond_the_context_fails_saying_so(
    joined: LocalFederation, serving_peer: str
) -> None:
    _submit(joined, "too-long", sampling={"maxTokens": 4000})
    status = _finished(joined, "too-long")
    assert status["phase"] == "Failed"
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["reason"] == "InvalidRequest"
    assert "more than the model's context of 2048" in complete["message"]
