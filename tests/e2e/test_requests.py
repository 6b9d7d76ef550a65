"""InferenceRequests end to end: the real operator schedules them onto a real llama.cpp worker
(the generated tiny model) registered as a peer, and writes the answer into the status."""

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from edgellm.api import GROUP, VERSION
from edgellm.dev.federation import LocalFederation
from edgellm.kube import APIError, NotFoundError, api_client, objects
from edgellm.kube.objects import INFERENCE_REQUESTS, PEER_NODES
from edgellm.worker.models import TINY, write_model
from tests.e2e.helpers import (
    OperatorProcess,
    eventually,
    peer_ready,
    request_events,
    serving_peer,
)

DONE = 120.0
EMPTY_PROMPT = {"name": "prompts", "key": "empty"}


@pytest.fixture(scope="module")
def tiny_peer(
    joined: LocalFederation,
    operators: dict[str, OperatorProcess],
    cluster_kubeconfigs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A worker serving tiny-random, joined as the peer edge-1-worker."""
    model = write_model(tmp_path_factory.mktemp("models") / "tiny-random.gguf", TINY)
    with serving_peer(
        cluster_kubeconfigs["edge-1"], "edge-1-worker", model, kv_events=True
    ) as peer:
        yield peer.name


@pytest.fixture(scope="module")
def remote_tiny_peer(
    tiny_peer: str, cluster_kubeconfigs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A second tiny-random worker, joined in edge-2: edge-1 sees it as a mirror."""
    model = write_model(tmp_path_factory.mktemp("models") / "tiny-random.gguf", TINY)
    with serving_peer(
        cluster_kubeconfigs["edge-2"], "edge-2-worker", model, kv_events=True
    ) as peer:
        yield peer.name


def _get(joined: LocalFederation, plural: str, name: str) -> dict[str, Any] | None:
    resource = PEER_NODES if plural == "peernodes" else INFERENCE_REQUESTS
    with api_client(joined.clusters[0].kubeconfig("admin")) as api:
        try:
            return objects.get(api, resource, name, None if plural == "peernodes" else "default")
        except NotFoundError:
            return None


def _submit(joined: LocalFederation, name: str, **spec: Any) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceRequest",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            key: value
            for key, value in {
                "model": "tiny-random",
                "messages": [{"role": "user", "content": "Hello there"}],
                **spec,
            }.items()
            if value is not None
        },
    }
    with api_client(joined.clusters[0].kubeconfig("admin")) as api:
        objects.create(api, INFERENCE_REQUESTS, body)


def _finished(joined: LocalFederation, name: str) -> dict[str, Any]:
    def phase() -> dict[str, Any] | None:
        body = _get(joined, "inferencerequests", name)
        status = (body or {}).get("status", {})
        return status if status.get("phase") in ("Succeeded", "Failed", "Cancelled") else None

    return eventually(phase, DONE, f"{name} finishes")


def _events(joined: LocalFederation, name: str) -> set[str]:
    return {e.reason for e in request_events(joined, name)}


def test_a_request_succeeds_with_text_tokens_and_timings(
    joined: LocalFederation, tiny_peer: str
) -> None:
    # Pinned to the peer's cluster: a module's later tests add a second peer of the model.
    placement = {"clusters": [_cluster(tiny_peer)]}
    sampling = {"maxTokens": 24, "temperature": 0}
    _submit(joined, "first-answer", placement=placement, sampling=sampling)
    status = _finished(joined, "first-answer")
    assert status["phase"] == "Succeeded", status
    assert status["assignment"]["decodePeer"] == tiny_peer
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


def test_concurrent_requests_all_succeed(joined: LocalFederation, tiny_peer: str) -> None:
    names = [f"concurrent-{i}" for i in range(20)]
    for name in names:
        _submit(joined, name, sampling={"maxTokens": 8})
    phases = [_finished(joined, name)["phase"] for name in names]
    assert phases == ["Succeeded"] * len(names)


@pytest.mark.parametrize(
    ("name", "spec", "reason", "says"),
    [
        (
            "unknown-model",
            {"model": "llama-9000b"},
            "UnknownModel",
            "no peer of the federation holds model 'llama-9000b'",
        ),
        (
            "too-long",
            {"sampling": {"maxTokens": 4000}},
            "InvalidRequest",
            "more than the model's context of 2048",
        ),
        (
            "no-peer-able",
            {"placement": {"clusters": ["edge-3"]}},
            "NoPeerAvailable",
            "is outside placement.clusters",
        ),
        (
            "empty-prompt",
            {
                "messages": None,
                "promptFrom": {"configMapKeyRef": {"name": "prompts", "key": "empty"}},
            },
            "EmptyPrompt",
            "key 'empty' of prompts is empty",
        ),
    ],
)
def test_a_bad_request_fails_saying_why_and_disturbs_nothing(
    joined: LocalFederation, tiny_peer: str, name: str, spec: dict[str, Any], reason: str, says: str
) -> None:
    with api_client(joined.clusters[0].kubeconfig("admin")) as api:
        prompts = {"metadata": {"name": "prompts"}, "data": {"empty": ""}}
        with contextlib.suppress(client.ApiException):  # made by an earlier case
            client.CoreV1Api(api).create_namespaced_config_map("default", prompts)
    _submit(joined, name, **spec)
    _submit(joined, f"{name}-neighbour", sampling={"maxTokens": 8})
    status = _finished(joined, name)
    assert status["phase"] == "Failed"
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["reason"] == reason
    assert says in complete["message"]
    assert reason in _events(joined, name)
    assert _finished(joined, f"{name}-neighbour")["phase"] == "Succeeded"


def test_an_empty_prompt_is_refused_at_apply(joined: LocalFederation, tiny_peer: str) -> None:
    with pytest.raises(APIError) as refused:
        _submit(joined, "empty-inline", messages=None, prompt="")
    assert refused.value.status == 422
    assert "spec.prompt" in str(refused.value)


def test_a_large_output_goes_to_a_config_map_the_request_owns(
    joined: LocalFederation, tiny_peer: str
) -> None:
    _submit(
        joined,
        "large-output",
        messages=None,
        prompt="hello",
        sampling={"maxTokens": 2000, "temperature": 0, "ignoreEos": True},
    )
    status = _finished(joined, "large-output")
    assert status["phase"] == "Succeeded", status
    output = status["output"]
    assert "text" not in output
    assert output["completionTokens"] == 2000
    ref = output["configMapRef"]
    with api_client(joined.clusters[0].kubeconfig("admin")) as api:
        config_map = client.CoreV1Api(api).read_namespaced_config_map(ref["name"], "default")
    assert len(config_map.data[ref["key"]].encode()) > 4096  # the operators' limit in tests
    request = _get(joined, "inferencerequests", "large-output")
    assert request is not None
    assert config_map.metadata.owner_references[0].uid == request["metadata"]["uid"]


def test_a_session_keeps_its_peer_until_its_idle_ttl(
    joined: LocalFederation, tiny_peer: str, remote_tiny_peer: str
) -> None:
    other = _away_from_the_default(joined, tiny_peer, remote_tiny_peer, "session-control")
    chat = {"name": "chat-1", "idleTTLSeconds": 600}
    _submit(joined, "turn-1", session=chat, placement={"clusters": [_cluster(other)]})
    assert _finished(joined, "turn-1")["assignment"]["decodePeer"] == other
    _submit(joined, "turn-2", session=chat)
    assert _finished(joined, "turn-2")["assignment"]["decodePeer"] == other
    messages = [e.message for e in request_events(joined, "turn-2")]
    assert any("the session's warm peer" in m for m in messages)


def _away_from_the_default(
    joined: LocalFederation, tiny_peer: str, remote_tiny_peer: str, control: str
) -> str:
    """The peer the scheduler would not choose now for a plain request: where a test puts
    what should draw the next request (a session, a prefix) to show that it does."""
    eventually(
        lambda: peer_ready(joined.clusters[0].kubeconfig("admin"), remote_tiny_peer),
        DONE,
        "edge-1 sees edge-2's peer Ready",
    )
    _submit(joined, control, sampling={"maxTokens": 2})
    default = _finished(joined, control)["assignment"]["decodePeer"]
    return remote_tiny_peer if default == tiny_peer else tiny_peer


def _cluster(peer: str) -> str:
    return peer.split("-worker")[0]


def test_peers_report_their_workers_load(joined: LocalFederation, tiny_peer: str) -> None:
    # The load is measured from generations: this test has the peer make one of its own.
    placement = {"clusters": [_cluster(tiny_peer)]}
    _submit(joined, "load-maker", placement=placement, sampling={"maxTokens": 16})
    assert _finished(joined, "load-maker")["assignment"]["decodePeer"] == tiny_peer

    def measured() -> dict[str, Any] | None:
        load = ((_get(joined, "peernodes", tiny_peer) or {}).get("status") or {}).get("load", {})
        return load if load.get("tokensPerSecond", 0) > 0 else None

    load = eventually(measured, DONE, "the peer's heartbeat carries its worker's tokens/s")
    assert load["prefillTokensPerSecond"] > 0


def test_a_prompt_goes_to_the_peer_that_holds_its_prefix(
    joined: LocalFederation, tiny_peer: str, remote_tiny_peer: str
) -> None:
    other = _away_from_the_default(joined, tiny_peer, remote_tiny_peer, "prefix-control")
    shared = "peers pool their machines to serve models none could serve alone; " * 6
    greedy = {"maxTokens": 4, "temperature": 0}
    placement = {"clusters": [_cluster(other)]}
    first = {"messages": None, "prompt": shared + "first", "sampling": greedy}
    _submit(joined, "prefix-first", placement=placement, **first)
    assert _finished(joined, "prefix-first")["assignment"]["decodePeer"] == other
    # No placement now: the peer's KV events said it holds the prefix.
    _submit(joined, "prefix-second", messages=None, prompt=shared + "second", sampling=greedy)
    status = _finished(joined, "prefix-second")
    assert status["assignment"]["decodePeer"] == other
    assert status["cache"]["cachedTokens"] >= 16 * 4
