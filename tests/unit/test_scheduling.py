"""Placement: filters say why a peer cannot serve, scorers rank the rest, the picker repeats."""

from typing import Any

from edgellm.api import InferenceRequestSpec, PeerNode
from edgellm.scheduling import (
    Candidate,
    Decision,
    Unschedulable,
    default_profile,
    registry,
    schedule,
)

REQUEST = InferenceRequestSpec.model_validate({"model": "tiny-random", "prompt": "hi"})


def _candidate(
    name: str, local: bool = True, ready: bool = True, running: int = 0, **spec: Any
) -> Candidate:
    peer = PeerNode.model_validate(
        {
            "metadata": {"name": name, "labels": spec.pop("labels", {})},
            "spec": {
                "cluster": "edge-1",
                "endpoint": "http://127.0.0.1:8600",
                "roles": ["prefill", "decode"],
                "backends": ["llamacpp"],
                "resources": {"cpu": 4, "memory": "8Gi"},
                "models": [{"name": "tiny-random"}],
                **spec,
            },
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True" if ready else "False",
                        "reason": "HeartbeatFresh" if ready else "HeartbeatExpired",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }
                ],
                "load": {"runningRequests": running},
            },
        }
    )
    return Candidate(peer, local)


def test_the_least_loaded_ready_peer_holding_the_model_is_chosen() -> None:
    peers = [_candidate("busy", running=3), _candidate("idle"), _candidate("down", ready=False)]
    decision = schedule(REQUEST, peers, default_profile())
    assert isinstance(decision, Decision)
    assert decision.peer.name == "idle"
    assert set(decision.plugin_seconds) >= {"healthy", "has-model", "least-loaded"}


def test_an_unschedulable_request_says_why_for_every_peer() -> None:
    peers = [
        _candidate("other-model", models=[{"name": "llama-70b"}]),
        _candidate("down", ready=False),
    ]
    result = schedule(REQUEST, peers, default_profile())
    assert isinstance(result, Unschedulable)
    assert result.reasons == {"does not hold model 'tiny-random'": 1, "is not Ready": 1}
    assert "1 peer(s): is not Ready" in result.message
    assert Unschedulable({}).message == "no peer is known in this federation"


def test_peers_that_failed_this_request_are_excluded() -> None:
    peers = [_candidate("a"), _candidate("b")]
    decision = schedule(REQUEST, peers, default_profile(), excluded=frozenset({"a"}))
    assert isinstance(decision, Decision)
    assert decision.peer.name == "b"


def test_placement_constraints_filter_peers() -> None:
    request = InferenceRequestSpec.model_validate(
        {
            "model": "tiny-random",
            "prompt": "hi",
            "placement": {
                "minTrust": "trusted",
                "peerSelector": {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]},
            },
        }
    )
    peers = [
        _candidate("community-gpu", labels={"gpu": "yes"}),
        _candidate("trusted-cpu", trustLevel="trusted"),
        _candidate("trusted-gpu", trustLevel="trusted", labels={"gpu": "yes"}),
    ]
    decision = schedule(request, peers, default_profile())
    assert isinstance(decision, Decision)
    assert decision.peer.name == "trusted-gpu"


def test_a_local_peer_wins_a_tie_and_ties_otherwise_repeat() -> None:
    decision = schedule(
        REQUEST, [_candidate("remote", local=False), _candidate("near")], default_profile()
    )
    assert isinstance(decision, Decision)
    assert decision.peer.name == "near"
    again = schedule(REQUEST, [_candidate("b"), _candidate("a")], default_profile())
    assert isinstance(again, Decision)
    assert again.peer.name == "a"


def test_the_registry_names_every_plugin_once() -> None:
    plugins = registry()
    assert {"has-model", "healthy", "least-loaded", "max-score"} <= set(plugins)
    assert all(factory().name == name for name, factory in plugins.items())
