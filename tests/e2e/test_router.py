"""The router end to end, through the official `openai` client: a real `edgellm router`
process over real llama.cpp workers joined as peers of two federated clusters, its API keys in a
real Secret, its KV index fed by the workers' KV events."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes import client

from edgellm.dev.federation import LocalFederation
from edgellm.kube import api_client, objects
from edgellm.kube.objects import PEER_NODES
from edgellm.worker.models import TINY, write_model
from tests.e2e.helpers import (
    OperatorProcess,
    ServingPeer,
    eventually,
    peer_ready,
    routed_peers,
    router_process,
    serving_peer,
)

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789", "carol": "sk-carol-0123"}
RATE_LIMIT = 100  # per minute and key: the tests stay under it with alice; bob goes over
SHARED = "peers pool their machines to serve models none could serve alone; " * 12


@dataclass
class Router:
    url: str
    peers: dict[str, ServingPeer]

    def client(self, key: str = KEYS["alice"]) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/healthz", timeout=5).json())

    def index_blocks(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("edgellm_router_kv_index_blocks{")
        )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny-random.gguf", TINY)


@pytest.fixture(scope="module")
def router(
    joined: LocalFederation,
    operators: dict[str, OperatorProcess],
    cluster_kubeconfigs: dict[str, Path],
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Router]:
    """A router in edge-1 over a tiny-model peer of edge-1 and one of edge-2 (a mirror)."""
    edge1 = joined.clusters[0].kubeconfig("admin")
    with api_client(edge1) as api:
        secret = client.V1Secret(
            metadata=client.V1ObjectMeta(name="edgellm-router-api-keys"), string_data=KEYS
        )
        client.CoreV1Api(api).create_namespaced_secret("default", secret)
    kubeconfig = cluster_kubeconfigs["edge-1"]
    with (
        serving_peer(kubeconfig, "edge-1-router-a", tiny_model, kv_events=True) as local,
        serving_peer(
            cluster_kubeconfigs["edge-2"], "edge-2-router-b", tiny_model, kv_events=True
        ) as remote,
    ):
        eventually(lambda: peer_ready(edge1, remote.name), 60, "edge-1 sees edge-2's peer")
        log = tmp_path_factory.mktemp("router") / "router.log"
        limits = (f"--rate-limit={RATE_LIMIT}/minute", "--failure-cooldown=30")
        with router_process(kubeconfig, log, *limits) as url:
            eventually(lambda: routed_peers(url) >= 2, 60, "the router lists both peers")
            yield Router(url, {local.name: local, remote.name: remote})


def test_chat_completions_answer_through_the_openai_client(router: Router) -> None:
    answer = router.client().chat.completions.create(
        model="tiny-random",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 8
    assert answer.usage.prompt_tokens > 0


def test_completions_answer_whole_and_streamed_with_the_same_text(router: Router) -> None:
    whole = router.client().completions.create(
        model="tiny-random",
        prompt="the model",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    chunks = list(
        router.client().completions.create(
            model="tiny-random",
            prompt="the model",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].text == streamed
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_streams_deltas_ending_with_a_finish_reason(router: Router) -> None:
    stream = router.client().chat.completions.create(
        model="tiny-random",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_models_lists_what_the_federation_serves(router: Router) -> None:
    assert [m.id for m in router.client().models.list()] == ["tiny-random"]


def test_bad_keys_unknown_models_and_bad_bodies_get_openai_errors(router: Router) -> None:
    with pytest.raises(openai.AuthenticationError):
        router.client("sk-wrong").models.list()
    with pytest.raises(openai.NotFoundError) as unknown:
        router.client().completions.create(model="no-such-model", prompt="hi")
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        router.client().completions.create(model="tiny-random", prompt="hi", temperature=7)
    assert "temperature" in bad.value.message
    with pytest.raises(openai.BadRequestError) as many:
        router.client().completions.create(model="tiny-random", prompt="hi", n=2)
    assert "n=1" in many.value.message
    headers = {"Authorization": f"Bearer {KEYS['alice']}", "Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", b'{"model": "tiny-random"}'):
        answer = httpx.post(f"{router.url}/v1/completions", content=body, headers=headers)
        assert answer.status_code == 400, body
        assert answer.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.get(f"{router.url}/v1/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"


def test_oversized_bodies_and_prompts_are_refused(router: Router) -> None:
    with pytest.raises(openai.APIStatusError) as large:
        router.client().completions.create(model="tiny-random", prompt="x" * (2 << 20))
    assert large.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as long:
        router.client().completions.create(
            model="tiny-random", prompt="the model " * 1500, max_tokens=8
        )
    assert "context" in long.value.message


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(router: Router) -> None:
    headers = {"Authorization": f"Bearer {KEYS['bob']}"}
    statuses = []
    for _ in range(RATE_LIMIT + 1):
        answer = httpx.get(f"{router.url}/v1/models", headers=headers)
        statuses.append(answer.status_code)
        if answer.status_code == 429:
            assert int(answer.headers["Retry-After"]) >= 1
            assert answer.json()["error"]["code"] == "rate_limit_exceeded"
            break
    assert statuses.count(200) == RATE_LIMIT
    assert statuses[-1] == 429
    router.client().models.list()  # other keys are not limited by bob's use


# Any JSON value, valid for some field or not: what a careless or hostile client may send.
_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 100_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
_MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer", "robot"])},
        optional={"content": st.one_of(st.text(max_size=40), _ANY)},
    ),
    max_size=3,
)
_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.just("tiny-random"), _ANY),
        "messages": st.one_of(_MESSAGES, _ANY),
        "prompt": st.one_of(st.text(max_size=60), _ANY),
        "max_tokens": st.one_of(st.integers(1, 4), _ANY),
        "temperature": _ANY,
        "top_p": _ANY,
        "stop": _ANY,
        "n": _ANY,
        "seed": _ANY,
        "stream": st.booleans(),
        "stream_options": _ANY,
    },
)


@settings(max_examples=45, deadline=None)
@given(body=_BODIES, chat=st.booleans())
def test_fuzzed_request_bodies_never_get_a_5xx(
    router: Router, body: dict[str, object], chat: bool
) -> None:
    path = "chat/completions" if chat else "completions"
    answer = httpx.post(
        f"{router.url}/v1/{path}",
        content=json.dumps(body).encode(),  # NaN and Infinity too, which JSON does not allow
        headers={"Authorization": f"Bearer {KEYS['carol']}", "Content-Type": "application/json"},
        timeout=120,
    )
    assert answer.status_code < 500, answer.text
    if answer.status_code >= 400:
        assert set(answer.json()["error"]) >= {"message", "type"}


def _served_by(router: Router, prompt: str, model: str = "tiny-random") -> tuple[str, int]:
    answer = router.client().completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=2, temperature=0
    )
    usage = answer.parse().usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    return answer.headers["x-edgellm-peer"], usage.prompt_tokens_details.cached_tokens or 0


def test_a_prompt_goes_to_the_worker_that_holds_its_prefix(router: Router) -> None:
    default, _ = _served_by(router, "hi")  # too short for a full block: no KV to follow
    (other,) = set(router.peers) - {default}
    url = router.peers[other].worker.url
    prompt_blocks = len(SHARED) // 4 // 16  # at least: about four characters a token

    def warmed() -> bool:
        # Straight to the worker, not through the router: only its KV events can tell.
        body = {"model": "tiny-random", "prompt": SHARED + "warm", "max_tokens": 2}
        httpx.post(f"{url}/v1/completions", json=body, timeout=30).raise_for_status()
        try:
            eventually(lambda: router.index_blocks() >= prompt_blocks, 5, "KV events arrive")
        except pytest.fail.Exception:
            evict = {"model": "tiny-random", "prompt": "evict"}
            httpx.post(f"{url}/v1/completions", json=evict, timeout=30)
            return False
        return True

    eventually(warmed, 60, f"the router's index holds {other}'s prefix")
    peer, cached = _served_by(router, SHARED + "a question")
    assert peer == other
    assert cached >= prompt_blocks * 16


def test_a_split_request_prefills_on_one_worker_and_decodes_on_another(router: Router) -> None:
    def complete(disaggregation: str) -> Any:
        return router.client().completions.with_raw_response.create(
            model="tiny-random",
            prompt=SHARED + "split",
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True, "disaggregation": disaggregation},
        )

    together, split = complete("never"), complete("always")
    assert "x-edgellm-prefill-peer" not in together.headers
    assert split.headers["x-edgellm-prefill-peer"] != split.headers["x-edgellm-peer"]
    answer = split.parse()
    assert answer.usage is not None
    assert answer.usage.prompt_tokens_details is not None
    # The decode worker computed none of the prompt: it loaded its KV from the prefill worker.
    assert answer.usage.prompt_tokens_details.cached_tokens == answer.usage.prompt_tokens
    assert answer.choices[0].text == together.parse().choices[0].text
    metrics = httpx.get(f"{router.url}/metrics").text
    assert 'edgellm_router_disaggregation_decisions_total{split="true"}' in metrics
    transfers = next(
        line
        for line in metrics.splitlines()
        if line.startswith("edgellm_router_kv_transfer_dur") and "_count " in line
    )
    assert float(transfers.split()[-1]) >= 1


def _drain(joined: LocalFederation, name: str, unschedulable: bool) -> None:
    """Marks edge-1's peer `name` unschedulable, or no longer."""
    with api_client(joined.clusters[0].kubeconfig("admin")) as api:
        objects.patch(api, PEER_NODES, name, {"spec": {"unschedulable": unschedulable}})


def test_a_drained_local_peer_leaves_its_requests_to_another_members_peer(
    router: Router, joined: LocalFederation
) -> None:
    local, remote = "edge-1-router-a", "edge-2-router-b"
    _drain(joined, local, True)
    try:
        eventually(lambda: _served_by(router, "drained")[0] == remote, 30, f"{remote} serves")
        assert {_served_by(router, f"drained {n}")[0] for n in range(3)} == {remote}
    finally:
        _drain(joined, local, False)
    eventually(lambda: not router.health()["draining"], 30, f"the router takes {local} back")


def test_a_worker_killed_mid_stream_loses_no_request(
    router: Router,
    joined: LocalFederation,
    cluster_kubeconfigs: dict[str, Path],
    tmp_path: Path,
) -> None:
    """The worker it kills serves a model of this test's own, on one of two peers joined for
    it: the module's peers stay whole, whatever runs after."""
    model = write_model(tmp_path / "tiny-victim.gguf", TINY)
    edge1 = joined.clusters[0].kubeconfig("admin")
    with (
        serving_peer(cluster_kubeconfigs["edge-1"], "edge-1-victim-a", model) as first,
        serving_peer(cluster_kubeconfigs["edge-2"], "edge-2-victim-b", model) as second,
    ):
        peers = {first.name: first, second.name: second}
        eventually(lambda: peer_ready(edge1, second.name), 60, "edge-1 sees edge-2's new peer")
        # Both are Ready; a router refresh after that, which draining one and back shows, and
        # the router has seen it: the request's second attempt finds the other peer Ready.
        _drain(joined, first.name, True)
        eventually(lambda: first.name in router.health()["draining"], 30, "a refresh")
        _drain(joined, first.name, False)
        eventually(lambda: not router.health()["draining"], 30, "another refresh")
        raw = router.client().completions.with_raw_response.create(
            model=model.stem,
            prompt="the model",
            temperature=0,
            max_tokens=1800,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        victim = raw.headers["x-edgellm-peer"]
        text, usage = [], None
        for number, chunk in enumerate(raw.parse()):
            if number == 3:
                peers[victim].worker.process.kill()
            if chunk.choices:
                text.append(chunk.choices[0].text)
            usage = chunk.usage or usage
        assert usage is not None
        assert usage.completion_tokens == 1800  # the second worker went on where the first stopped
        assert "".join(text)
        failures = httpx.get(f"{router.url}/metrics").text
        assert f'edgellm_router_worker_failures_total{{peer="{victim}"}} 1.0' in failures
        for _ in range(5):
            peer, _ = _served_by(router, "after the loss", model.stem)
            assert peer != victim
