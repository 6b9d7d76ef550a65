"""The attempt loop, without a cluster: workers are httpx's `MockTransport`, answering as a worker
does (OpenAI chunks with vLLM's continuous usage), and the hooks record what the router and the
operator would."""

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from edgellm.api import InferenceRequestSpec
from edgellm.scheduling.layersplit import LayerPlan, plan_layer_split
from edgellm.workerapi import (
    Job,
    Outcome,
    OutOfAttemptsError,
    Piece,
    Placement,
    Progress,
    StagesLostError,
    WorkerClient,
    WorkerFailedError,
    WorkerRefusedError,
    attempts,
    estimated_tokens,
)
from edgellm.workerapi.attempts import lost_peers, worker_request
from edgellm.workerapi.protocol import ChatCompletionRequest, CompletionRequest
from tests.builders import candidate

PROMPT = InferenceRequestSpec.model_validate(
    {"model": "m", "prompt": "Once", "sampling": {"maxTokens": 6, "temperature": 0}}
)
CHAT = InferenceRequestSpec.model_validate(
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "sampling": {"maxTokens": 6}}
)


def _chunk(text: str, generated: int, prompt: int, finish: str | None = None) -> str:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    usage = {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": 0}
    chunk = {"id": "c", "object": "text_completion", "created": 1, "model": "m"}
    return "data: " + json.dumps({**chunk, "choices": [choice], "usage": usage}) + "\n\n"


def _stream(words: list[str], prompt: int, finish: str | None = "length", cached: int = 0) -> str:
    """A worker's answer: one chunk per word, then (when it finishes) the usage and [DONE]."""
    body = "".join(_chunk(w, i + 1, prompt) for i, w in enumerate(words))
    if finish is None:
        return body  # cut short: the worker died
    details = {"cached_tokens": cached}
    usage = {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": 0}
    last = {"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": []}
    return (
        body
        + _chunk("", len(words), prompt, finish)
        + "data: "
        + json.dumps({**last, "usage": {**usage, "prompt_tokens_details": details}})
        + "\n\ndata: [DONE]\n\n"
    )


Answer = Callable[[dict[str, Any]], httpx.Response]


def _sse(text: str) -> httpx.Response:
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


@dataclass
class Workers:
    """Workers by host: each answers the requests it is sent with its own function."""

    answers: dict[str, Answer]
    asked: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            body = json.loads(request.content)
            self.asked.append((request.url.host, body))
            return self.answers[request.url.host](body)

        return httpx.MockTransport(handle)


@dataclass
class Hooks:
    """Places each attempt on the first peer not excluded, and records every call."""

    peers: list[str]
    layers: LayerPlan | None = None
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    async def place(self, attempt: int, excluded: frozenset[str]) -> Placement:
        self.calls.append(("place", attempt, excluded))
        peer = next(p for p in self.peers if p not in excluded)
        return Placement(peer, f"http://{peer}", self.layers)

    async def started(self, attempt: int, placement: Placement) -> None:
        self.calls.append(("started", attempt, placement.peer))

    async def failed(
        self, attempt: int, placement: Placement, error: WorkerFailedError, lost: set[str]
    ) -> None:
        self.calls.append(("failed", attempt, placement.peer, lost))

    def ended(self, placement: Placement) -> None:
        self.calls.append(("ended", placement.peer))


def _run(
    workers: Workers,
    hooks: Hooks,
    spec: InferenceRequestSpec = PROMPT,
    progress: Progress | None = None,
    **options: Any,
) -> list[Piece | Outcome]:
    async def scenario() -> list[Piece | Outcome]:
        client = WorkerClient(workers.transport())
        try:
            loop = attempts(
                client,
                Job("job", spec),
                hooks,
                request_id=lambda attempt: f"job-{attempt}",
                progress=progress,
                **options,
            )
            return [event async for event in loop]
        finally:
            await client.aclose()

    return asyncio.run(scenario())


def test_a_worker_lost_mid_generation_is_left_out_and_another_goes_on_from_its_text() -> None:
    workers = Workers(
        {
            "a": lambda body: _sse(_stream(["one", " two"], prompt=3, finish=None)),
            "b": lambda body: _sse(_stream([" three", " four", " five", " six"], prompt=5)),
        }
    )
    hooks = Hooks(["a", "b"])
    events = _run(workers, hooks)

    *pieces, outcome = events
    assert [p.text for p in pieces if isinstance(p, Piece)] == [
        "one",
        " two",
        " three",
        " four",
        " five",
        " six",
    ]
    assert isinstance(outcome, Outcome)
    assert outcome.completion_tokens == 6
    assert outcome.prompt_tokens == 3, "as the worker that computed the bare prompt counted"
    assert (outcome.attempt, outcome.placement.peer, outcome.finish_reason) == (2, "b", "length")
    (_, first), (_, second) = workers.asked
    assert (first["prompt"], first["max_tokens"], first["request_id"]) == ("Once", 6, "job-1")
    assert (second["prompt"], second["max_tokens"]) == ("Onceone two", 4)
    assert second["request_id"] == "job-2"
    assert hooks.calls == [
        ("place", 1, frozenset()),
        ("started", 1, "a"),
        ("failed", 1, "a", {"a"}),
        ("ended", "a"),
        ("place", 2, frozenset({"a"})),
        ("started", 2, "b"),
        ("ended", "b"),
    ]


def test_a_chat_goes_on_from_the_assistants_unfinished_message() -> None:
    progress = Progress(text="so far", tokens=2)
    request = worker_request(Job("j", CHAT), progress, Placement("p", "http://p"), "j-3")
    assert isinstance(request, ChatCompletionRequest)
    assert [(m.role, m.content) for m in request.messages] == [
        ("user", "hi"),
        ("assistant", "so far"),
    ]
    assert request.continue_final_message
    assert not request.add_generation_prompt
    assert request.max_tokens == 4
    fresh = worker_request(Job("j", CHAT), Progress(), Placement("p", "http://p"), "j-1")
    assert isinstance(fresh, ChatCompletionRequest)
    assert (len(fresh.messages), fresh.continue_final_message) == (1, False)


def test_the_placement_says_where_the_kv_comes_from_and_how_the_model_is_split() -> None:
    layers = _split()
    placement = Placement("head", "http://head", layers, kv_from="http://other/v1/kv/j")
    request = worker_request(Job("j", PROMPT), Progress(), placement, "j-1")
    assert isinstance(request, CompletionRequest)
    assert request.kv_from == "http://other/v1/kv/j"
    assert request.split is not None
    assert [(s.endpoint, s.layers) for s in request.split.stages] == layers.lenders()
    assert request.split.leader_layers == layers.stages[0].layers
    with pytest.raises(ValueError, match="generated its 6 tokens"):
        worker_request(Job("j", PROMPT), Progress(tokens=6), placement, "j-2")


def _split() -> LayerPlan:
    big = {"name": "m", "sizeBytes": 80 * 2**20, "layers": 8, "kvBytesPerToken": 0}
    peers = [
        candidate("head", resources={"cpu": 4, "memory": "30Mi"}, models=[big]),
        candidate("b", resources={"cpu": 4, "memory": "60Mi"}, rpcServer={"endpoint": "b:1"}),
    ]
    spec = InferenceRequestSpec.model_validate({"model": "m", "prompt": "p"})
    plan = plan_layer_split(spec, peers, 10)
    assert isinstance(plan, LayerPlan)
    return plan


def test_a_split_that_lost_stages_leaves_out_their_peers_not_its_leader() -> None:
    layers = _split()
    placement = Placement("head", "http://head", layers)
    assert lost_peers(placement, StagesLostError(["b:1"])) == {"b"}
    assert lost_peers(placement, StagesLostError(["elsewhere:9"])) == {"head"}
    assert lost_peers(placement, WorkerFailedError("its own child")) == {"head"}

    lost = {"error": {"message": "lost b:1", "type": "server_error", "lost_stages": ["b:1"]}}
    answers = iter([httpx.Response(503, json=lost), _sse(_stream(["x"], prompt=2))])
    workers = Workers({"head": lambda body: next(answers)})
    hooks = Hooks(["head", "other"], layers)
    events = _run(workers, hooks)
    assert isinstance(events[-1], Outcome)
    assert ("failed", 1, "head", {"b"}) in hooks.calls
    assert ("place", 2, frozenset({"b"})) in hooks.calls, "the leader itself is not excluded"


def test_a_refused_request_fails_at_once_and_the_attempt_still_ends() -> None:
    refusal = {"error": {"message": "the prompt has 4000 tokens", "type": "invalid_request_error"}}
    workers = Workers({"a": lambda body: httpx.Response(400, json=refusal)})
    hooks = Hooks(["a", "b"])
    with pytest.raises(WorkerRefusedError, match="4000 tokens") as caught:
        _run(workers, hooks)
    assert caught.value.status == 400
    assert hooks.calls[-1] == ("ended", "a")
    assert len(workers.asked) == 1, "another worker would refuse it too"


def test_after_its_last_allowed_attempt_the_loop_gives_up() -> None:
    def gone(body: dict[str, Any]) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    workers = Workers({"a": gone, "b": gone, "c": gone})
    hooks = Hooks(["a", "b", "c"])
    with pytest.raises(OutOfAttemptsError, match="2 workers failed"):
        _run(workers, hooks, max_attempts=2)
    assert [c for c in hooks.calls if c[0] == "failed"] == [
        ("failed", 1, "a", {"a"}),
        ("failed", 2, "b", {"b"}),
    ]


def test_attempts_are_numbered_from_where_an_earlier_operator_left_off() -> None:
    workers = Workers({"a": lambda body: _sse(_stream(["x", "y"], prompt=9))})
    progress = Progress(text="so far ", tokens=4, prompt_tokens=3)
    *_, outcome = _run(workers, Hooks(["a"]), progress=progress, first_attempt=3)
    assert isinstance(outcome, Outcome)
    assert (outcome.attempt, outcome.completion_tokens, outcome.prompt_tokens) == (3, 6, 3)
    assert workers.asked[0][1]["request_id"] == "job-3"
    assert workers.asked[0][1]["prompt"] == "Onceso far "
    assert progress.text == "so far xy"


def test_a_consumer_that_leaves_mid_stream_ends_the_attempt() -> None:
    workers = Workers({"a": lambda body: _sse(_stream(["x", "y", "z"], prompt=2))})
    hooks = Hooks(["a"])

    async def scenario() -> None:
        client = WorkerClient(workers.transport())
        loop = attempts(client, Job("j", PROMPT), hooks, request_id=str)
        await anext(loop)
        await loop.aclose()
        await client.aclose()

    asyncio.run(scenario())
    assert hooks.calls[-1] == ("ended", "a")


def test_a_prompt_is_counted_when_tokenized_and_estimated_otherwise() -> None:
    job = Job("j", InferenceRequestSpec.model_validate({"model": "m", "prompt": "x" * 400}))
    assert estimated_tokens(job) == 100
    assert estimated_tokens(job, [1, 2, 3]) == 3
    chat = Job("j", CHAT)
    assert estimated_tokens(chat) == len("user\nhi\n") // 4
