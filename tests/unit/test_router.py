"""The router's pure parts: who gets in, the OpenAI schemas, and the routing baselines."""

import asyncio
import base64
from typing import Any

import pytest
from pydantic import ValidationError

from edgellm.api import InferenceRequestSpec
from edgellm.kvcache import (
    MEDIUM_CPU,
    MEDIUM_IPFS,
    BlockStored,
    ExternalBlockHash,
    prompt_block_keys,
)
from edgellm.kvcache.index import IPFS_HIT_VALUE, KVIndex
from edgellm.kvcache.subscriptions import KVSubscriptions
from edgellm.router.access import Access, Denied
from edgellm.router.dispatch import Dispatcher, PromptKeys
from edgellm.router.metrics import RouterMetrics
from edgellm.router.peers import PeerDirectory
from edgellm.router.policies import RoutingHistory, policy_profile, text_chunk_keys
from edgellm.router.schemas import ChatCompletionRequest, CompletionRequest
from edgellm.scheduling import Candidate, Decision
from edgellm.workerapi import Job, WorkerClient
from tests.builders import candidate, peer_body

NOW = "2026-01-01T00:00:00Z"
SECRET = {"alice": base64.b64encode(b"sk-alice").decode()}


def _body(name: str, cluster: str = "home", ready: bool = True, model: str = "m") -> dict[str, Any]:
    return peer_body(
        name,
        ready=ready,
        cluster=cluster,
        endpoint=f"http://{name}:8600",
        roles=["decode"],
        models=[{"name": model, "format": "gguf"}],
    )


def _peer(name: str) -> Candidate:
    return candidate(name, **_body(name)["spec"])


def _part(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def test_a_valid_key_names_its_holder_and_others_are_turned_away() -> None:
    access = Access()
    access.set_secret(SECRET)
    assert access.check("Bearer sk-alice") == "alice"
    wrong = access.check("Bearer sk-mallory")
    missing = access.check(None)
    assert isinstance(wrong, Denied)
    assert wrong.status == 401
    assert isinstance(missing, Denied)
    assert "no API key" in missing.message


def test_anonymous_access_lets_any_key_in_but_a_valid_one_keeps_its_name() -> None:
    access = Access(anonymous=True)
    access.set_secret(SECRET)
    assert access.check("Bearer whatever") == "anonymous"
    assert access.check("Bearer sk-alice") == "alice"


def test_a_key_over_its_rate_gets_429_and_when_to_retry() -> None:
    access = Access(rate_limit="2/minute")
    access.set_secret({**SECRET, "bob": base64.b64encode(b"sk-bob").decode()})
    assert access.check("Bearer sk-alice") == "alice"
    assert access.check("Bearer sk-alice") == "alice"
    refused = access.check("Bearer sk-alice")
    assert isinstance(refused, Denied)
    assert refused.status == 429
    assert refused.retry_after is not None
    assert 1 <= refused.retry_after <= 60
    assert access.check("Bearer sk-bob") == "bob"


def test_a_chat_becomes_the_spec_an_inference_request_would_carry() -> None:
    asked = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
                },
            ],
            "max_completion_tokens": 7,
            "stop": "END",
            "unknown_newer_field": True,
        }
    )
    spec = asked.spec()
    assert [(m.role, m.content) for m in spec.messages or []] == [
        ("system", "be brief"),
        ("user", "hi there"),
    ]
    assert spec.sampling.max_tokens == 7
    assert spec.sampling.stop == ["END"]


def test_completions_default_to_sixteen_tokens_as_openai_does() -> None:
    spec = CompletionRequest.model_validate({"model": "m", "prompt": ["once"]}).spec()
    assert spec.prompt == "once"
    assert spec.sampling.max_tokens == 16


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"n": 2}, "n=1"),
        ({"logprobs": 3}, "log probabilities"),
        ({"echo": True}, "echo"),
        ({"prompt": ["a", "b"]}, "one prompt"),
        ({"temperature": 3}, "less than or equal to 2"),
    ],
)
def test_what_edgellm_cannot_serve_is_refused_by_name(body: dict[str, object], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        CompletionRequest.model_validate({"model": "m", "prompt": "p", **body})


def test_round_robin_takes_each_feasible_peer_in_turn() -> None:
    profile = policy_profile("round-robin")
    scored = [(_peer(name), 0.0) for name in ("c", "a", "b")]
    picked = [profile.picker.pick(scored).name for _ in range(4)]
    assert picked == ["a", "b", "c", "a"]
    assert profile.scorers == []


def test_least_load_scores_by_load_alone() -> None:
    assert [w.scorer.name for w in policy_profile("least-load").scorers] == ["least-loaded"]


def test_text_prefixes_share_their_leading_chunk_keys() -> None:
    shared = "x" * 300
    first, second = text_chunk_keys(shared + "a" * 200), text_chunk_keys(shared + "b" * 200)
    assert first[:2] == second[:2]
    assert first[2] != second[2]
    assert text_chunk_keys("short") == []


def test_routing_history_forgets_the_least_recently_routed_first() -> None:
    history = RoutingHistory(capacity=4)
    old, new = text_chunk_keys("o" * 128 * 3), text_chunk_keys("n" * 128 * 3)
    history.record("w", old)
    history.record("w", new)
    assert history.matched("w", new) == 3
    assert history.matched("w", old) == 0  # its first chunk was evicted: nothing matches
    assert history.matched("other", new) == 0


def test_an_inference_request_spec_is_what_the_scheduler_reads() -> None:
    # The router's spec is the API's own: placement defaults apply as for kubectl apply.
    spec = CompletionRequest.model_validate({"model": "m", "prompt": "p"}).spec()
    assert isinstance(spec, InferenceRequestSpec)
    assert spec.placement.disaggregation == "auto"


def test_the_own_clusters_peer_wins_when_scores_are_otherwise_equal() -> None:
    peers = PeerDirectory(None, KVSubscriptions(KVIndex()))
    # "a-away" comes first by name, which breaks exact ties: only locality can put "z-home" first.
    down = _body("b-down", ready=False)
    peers.set_peers([_body("a-away", "away"), _body("z-home", "home"), down])
    dispatcher = _dispatcher(peers, cluster="home")
    spec = CompletionRequest.model_validate({"model": "m", "prompt": "p"}).spec()
    assert _route(dispatcher, Job("j", spec)).peer.name == "z-home"
    peers.failed("z-home")  # a worker that just failed is routed around at once
    assert _route(dispatcher, Job("j", spec)).peer.name == "a-away"
    asyncio.run(peers.kv.stop())


def _dispatcher(peers: PeerDirectory, cluster: str | None = None) -> Dispatcher:
    return Dispatcher(
        peers=peers,
        index=peers.kv.index,
        client=WorkerClient(),
        metrics=RouterMetrics(),
        cluster=cluster,
    )


def _route(
    dispatcher: Dispatcher, job: Job, blocks: list[ExternalBlockHash] | None = None
) -> Decision:
    decision = dispatcher.route(job, PromptKeys(blocks=blocks or []), frozenset())
    assert decision is not None
    return decision


def test_a_prefix_in_ipfs_counts_for_every_peer_and_is_loaded_from_its_announcer() -> None:
    peers = PeerDirectory(None, KVSubscriptions(KVIndex()))
    peers.set_peers([_body("a"), _body("b")])
    blocks = prompt_block_keys(list(range(64)), seed="0")  # 4 full blocks
    peers.kv.index.apply("a", [_stored(blocks[:3], MEDIUM_IPFS)])
    peers.kv.index.apply("b", [_stored(blocks[:1], MEDIUM_CPU)])
    dispatcher = _dispatcher(peers)
    spec = CompletionRequest.model_validate({"model": "m", "prompt": "p"}).spec()
    decision = _route(dispatcher, Job("j", spec), blocks)
    # Three blocks in IPFS are worth more than one in memory, discounted for the fetch.
    assert decision.peer.cached_fraction == pytest.approx(IPFS_HIT_VALUE * 3 / 4)
    source = dispatcher.from_ipfs(Job("j", spec), decision, blocks)
    assert source is not None
    assert source.kv_from == f"http://a:8600/v1/kv/ipfs/{blocks[2]}"
    assert not source.prefilled
    asyncio.run(peers.kv.stop())


def _stored(hashes: list[ExternalBlockHash], medium: str) -> BlockStored:
    return BlockStored(hashes, None, [0] * 16 * len(hashes), 16, None, medium, None)


def test_kv_in_ipfs_of_another_models_peer_is_not_offered() -> None:
    # Block hashes name tokens, not models: the same tokens of another model are another KV.
    peers = PeerDirectory(None, KVSubscriptions(KVIndex()))
    peers.set_peers([_body("a", model="other"), _body("b")])
    blocks = prompt_block_keys(list(range(64)), seed="0")
    peers.kv.index.apply("a", [_stored(blocks, MEDIUM_IPFS)])
    dispatcher = _dispatcher(peers)
    job = Job("j", CompletionRequest.model_validate({"model": "m", "prompt": "p"}).spec())
    decision = _route(dispatcher, job, blocks)
    assert decision.peer.name == "b"
    assert decision.peer.cached_fraction == 0.0
    assert dispatcher.from_ipfs(job, decision, blocks) is None
    asyncio.run(peers.kv.stop())
