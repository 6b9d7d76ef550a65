"""Placement: filters say why a peer cannot serve, scorers rank the rest, the picker repeats."""

from dataclasses import dataclass
from typing import Any

import pytest

from edgellm.api import InferenceRequestSpec, quantity_value
from edgellm.operator.sessions import SessionTable
from edgellm.scheduling import (
    Candidate,
    Decision,
    Profile,
    ProfileConfig,
    Unschedulable,
    WeightedScorer,
    configured_profile,
    default_profile,
    registry,
    schedule,
)
from edgellm.scheduling.disaggregation import decide_split
from edgellm.scheduling.plugins import LeastLoaded, MaxScore
from tests.builders import candidate

REQUEST = InferenceRequestSpec.model_validate({"model": "tiny-random", "prompt": "hi"})


def _candidate(
    name: str,
    running: int = 0,
    prefill_rate: float = 0.0,
    labels: dict[str, str] | None = None,
    status_queue: int = 0,
    **fields: Any,
) -> Candidate:
    load = {
        "runningRequests": running,
        "queuedRequests": status_queue,
        "prefillTokensPerSecond": prefill_rate,
    }
    metadata = {"labels": labels or {}}
    return candidate(name, metadata=metadata, status={"load": load}, **fields)


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


def test_a_session_goes_back_to_its_warm_peer_even_when_busier() -> None:
    peers = [_candidate("idle"), _candidate("warm", running=2, warm=True)]
    decision = schedule(REQUEST, peers, default_profile())
    assert isinstance(decision, Decision)
    assert decision.peer.name == "warm"


def test_a_warm_peer_that_is_down_is_not_chosen() -> None:
    peers = [_candidate("idle"), _candidate("warm", ready=False, warm=True)]
    decision = schedule(REQUEST, peers, default_profile())
    assert isinstance(decision, Decision)
    assert decision.peer.name == "idle"


GPU_PEER: dict[str, Any] = {
    "backends": ["llamacpp", "vllm"],
    "models": [{"name": "m", "kvBytesPerToken": 131072}],
    "resources": {
        "cpu": 16,
        "memory": "64Gi",
        "accelerators": [{"vendor": "nvidia", "model": "RTX 4090", "memory": "24Gi"}],
    },
}


FAST_LINK: dict[str, Any] = {"network": {"uplinkMbps": 10000, "downlinkMbps": 10000}}


def test_prefill_is_split_only_when_moving_kv_beats_recomputing_it() -> None:
    home_link: dict[str, Any] = {"network": {"uplinkMbps": 20, "downlinkMbps": 100}}
    fast = _candidate("fast", prefill_rate=20000, **GPU_PEER, **FAST_LINK).peer
    slow = _candidate("slow", prefill_rate=500, **GPU_PEER, **FAST_LINK).peer
    split = decide_split("auto", fast, slow, "m", prompt_tokens=4000)
    assert split.split, split.reason  # 0.2 s + 0.4 s transfer against 8 s
    assert split.backend == "vllm", "LMCache moves the KV of peers that run both"
    far = _candidate("far", prefill_rate=20000, **GPU_PEER, **home_link).peer
    kept = decide_split("auto", far, slow, "m", prompt_tokens=4000)
    assert not kept.split  # 524 MB over 20 Mbit/s: minutes against 8 s
    assert kept.transfer_seconds is not None
    assert kept.transfer_seconds > 100


def test_two_llamacpp_peers_split_by_handing_over_the_kv_state() -> None:
    cpu: dict[str, Any] = {"models": [{"name": "m", "kvBytesPerToken": 32768}], **FAST_LINK}
    fast = _candidate("fast", prefill_rate=2000, **cpu).peer
    slow = _candidate("slow", prefill_rate=100, **cpu).peer
    split = decide_split("auto", fast, slow, "m", prompt_tokens=4000)
    assert split.split, split.reason  # 2 s + 0.1 s transfer against 40 s
    assert split.backend == "llamacpp"
    assert not decide_split("auto", slow, fast, "m", prompt_tokens=4000).split


def test_a_vllm_peer_and_a_llamacpp_peer_do_not_split() -> None:
    vllm_only = {**GPU_PEER, "backends": ["vllm"]}
    gpu = _candidate("gpu", prefill_rate=20000, **vllm_only, **FAST_LINK).peer
    cpu = _candidate("cpu", prefill_rate=100, **FAST_LINK).peer
    for prefill, decode in ((gpu, cpu), (cpu, gpu)):
        for mode in ("auto", "always"):
            kept = decide_split(mode, prefill, decode, "m", 4000)
            assert not kept.split
            assert "the same backend on both" in kept.reason


def test_prefill_is_not_split_without_figures_or_when_told_never() -> None:
    gpu = _candidate("gpu", prefill_rate=500, **GPU_PEER).peer
    assert not decide_split("never", gpu, gpu, "m", 4000).split
    unmeasured = _candidate("new", **GPU_PEER).peer
    assert not decide_split("auto", unmeasured, gpu, "m", 4000).split
    assert decide_split("always", unmeasured, gpu, "m", 4000).split


def test_a_session_is_forgotten_after_its_idle_ttl() -> None:
    sessions = SessionTable()
    sessions.served("default/chat", "peer-a", idle_ttl=300, now=1000.0)
    assert sessions.peer("default/chat", now=1299.0) == "peer-a"
    assert sessions.peer("default/chat", now=1301.0) is None
    assert sessions.peer("default/other", now=1000.0) is None


def test_a_peer_too_small_for_the_model_or_with_a_full_queue_is_filtered_out() -> None:
    big = [{"name": "tiny-random", "sizeBytes": 40 * 2**30}]
    peers = [
        _candidate("small", models=big),
        _candidate("gpu", models=big, resources=GPU_PEER["resources"]),
        _candidate("queued"),
    ]
    queued = peers[2].peer.model_copy(deep=True)
    queued.status.load.queued_requests = 16
    peers[2] = Candidate(queued, local=True)
    decision = schedule(REQUEST, peers, default_profile())
    assert isinstance(decision, Decision)
    assert decision.peer.name == "gpu"  # 64 GiB of memory and 24 GiB of GPU hold 40 GiB
    refused = schedule(REQUEST, peers[::2], default_profile())
    assert isinstance(refused, Unschedulable)
    assert "cannot hold 40.0 GiB of weights in 8.0 GiB" in refused.message
    assert "has 16 requests queued" in refused.message


def test_a_profile_from_configuration_sets_the_weights_and_keeps_the_rest() -> None:
    config = ProfileConfig.model_validate({"scorers": {"local": 1.0}})
    profile = configured_profile(config)
    assert [(w.scorer.name, w.weight) for w in profile.scorers] == [("local", 1.0)]
    assert profile.filters == default_profile().filters
    peers = [_candidate("idle", local=False), _candidate("busy-but-local", running=5)]
    decision = schedule(REQUEST, peers, profile)
    assert isinstance(decision, Decision)
    assert decision.peer.name == "busy-but-local"


def test_a_profile_naming_an_unknown_or_misplaced_plugin_is_refused() -> None:
    with pytest.raises(ValueError, match="'nope' is not a scorer; known: kv-cache-room"):
        configured_profile(ProfileConfig(scorers={"nope": 1.0}))
    with pytest.raises(ValueError, match="'least-loaded' is not a filter"):
        configured_profile(ProfileConfig(filters=["least-loaded"]))
    with pytest.raises(ValueError, match="negative"):
        configured_profile(ProfileConfig(scorers={"local": -1.0}))


def test_quantities_read_as_numbers() -> None:
    assert quantity_value("32Gi") == 32 * 2**30
    assert quantity_value("500m") == 0.5
    assert quantity_value("1.5e9") == 1.5e9
    assert quantity_value("2M") == 2_000_000
    assert quantity_value(8) == 8.0


def test_requests_the_scheduler_has_just_sent_count_before_any_heartbeat() -> None:
    peers = [_candidate("a"), _candidate("b")]
    peers[0] = Candidate(peers[0].peer, local=True, in_flight=1)
    decision = schedule(REQUEST, peers, default_profile())
    assert isinstance(decision, Decision)
    assert decision.peer.name == "b"


def test_a_plugins_parameters_come_from_the_profile() -> None:
    config = ProfileConfig.model_validate({"parameters": {"has-room": {"max_queued": 2}}})
    profile = configured_profile(config)
    has_room = next(f for f in profile.filters if f.name == "has-room")
    busy = _candidate("busy", status_queue=2)
    assert has_room.reason(REQUEST, busy) == "has 2 requests queued"
    assert default_profile().filters[2].reason(REQUEST, busy) is None, "16 by default"


def test_unknown_plugin_parameters_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'has-room' has no parameter max_queue; it takes"):
        configured_profile(ProfileConfig(parameters={"has-room": {"max_queue": 2}}))
    with pytest.raises(ValueError, match="parameters for unknown plugins: nope"):
        configured_profile(ProfileConfig(parameters={"nope": {}}))


@dataclass(frozen=True)
class _Loud:
    """A scorer that overshoots [0, 1], as a buggy plugin could."""

    name: str = "loud"

    def score(self, request: InferenceRequestSpec, candidate: Candidate) -> float:
        return 50.0 if candidate.name == "loud" else -3.0


def test_scores_count_within_zero_and_one_whatever_a_scorer_returns() -> None:
    profile = Profile(
        filters=[],
        scorers=[WeightedScorer(_Loud(), 1.0), WeightedScorer(LeastLoaded(), 2.0)],
        picker=MaxScore(),
    )
    decision = schedule(REQUEST, [_candidate("loud", running=3), _candidate("idle")], profile)
    assert isinstance(decision, Decision)
    # Clamped, "loud" scores 1 + 2 x 1/4; "idle" 0 + 2 x 1: the load decides.
    assert decision.peer.name == "idle"
    assert decision.score == pytest.approx(2.0)


def test_only_a_peer_too_small_for_the_model_leaves_room_for_a_split() -> None:
    big = [{"name": "tiny-random", "sizeBytes": 2**40}]
    small = schedule(REQUEST, [_candidate("small", models=big)], default_profile())
    down = schedule(REQUEST, [_candidate("down", ready=False)], default_profile())
    assert isinstance(small, Unschedulable)
    assert isinstance(down, Unschedulable)
    assert small.memory_short
    assert not down.memory_short
