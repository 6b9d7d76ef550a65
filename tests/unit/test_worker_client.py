"""The WorkerClient: streams read as vLLM writes them, and every failure as the worker API's
own error type. Workers are httpx's `MockTransport`, speaking what a worker (or `vllm serve`)
answers on the wire."""

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from edgellm.workerapi import (
    ClientBusyError,
    Finished,
    StagesLostError,
    Text,
    WorkerClient,
    WorkerFailedError,
    WorkerRefusedError,
)
from edgellm.workerapi.client import FinishReason, StreamReader
from edgellm.workerapi.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Message,
    TokenizeCompletionRequest,
)

WORKER = "http://worker:8600"


def text_chunk(text: str, completion_tokens: int, finish: str | None = None) -> str:
    """A chunk as vLLM 0.33 writes it with continuous usage: `exclude_unset=True` keeps the
    fields its constructor was given, Nones included."""
    stop_reason = "\n\n" if finish == "stop" else None
    return "data: " + json.dumps(
        {
            "id": "cmpl-3f2a",
            "object": "text_completion",
            "created": 1767225600,
            "model": "llama-8b",
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": stop_reason,
                    "prompt_token_ids": None,
                    "token_ids": None,
                    "weight_versions": None,
                }
            ],
            "kv_transfer_params": None,
            "usage": {
                "prompt_tokens": 300,
                "completion_tokens": completion_tokens,
                "total_tokens": 300 + completion_tokens,
            },
        }
    )


def usage_chunk(completion_tokens: int, cached: int | None) -> str:
    """The final usage chunk, dumped with `exclude_none=True`."""
    usage: dict[str, Any] = {
        "prompt_tokens": 300,
        "total_tokens": 300 + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    chunk = {"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": []}
    return "data: " + json.dumps({**chunk, "usage": usage})


def read(lines: list[str]) -> list[Text | Finished]:
    reader = StreamReader()
    events = [event for line in lines for event in reader.feed(line)]
    assert reader.done
    return events


def test_text_arrives_as_it_streams_and_the_finish_waits_for_the_usage() -> None:
    lines = [
        text_chunk("Once", 1),
        "",
        text_chunk(" upon", 2),
        "",
        text_chunk(" a time", 4, "stop"),
        "",
        usage_chunk(4, cached=256),
        "",
        "data: [DONE]",
        "",
    ]
    *texts, finished = read(lines)
    assert texts == [Text("Once", 1, 300), Text(" upon", 2, 300), Text(" a time", 4, 300)]
    assert isinstance(finished, Finished)
    assert finished.finish_reason == "stop"
    assert (finished.usage.prompt_tokens, finished.usage.completion_tokens) == (300, 4)
    assert finished.usage.cached_tokens == 256


def test_without_prompt_details_no_tokens_count_as_cached() -> None:
    *_, finished = read([text_chunk("x", 1, "length"), usage_chunk(1, cached=None), "data: [DONE]"])
    assert isinstance(finished, Finished)
    assert finished.usage.cached_tokens == 0


def test_without_continuous_usage_each_chunk_counts_as_one_token() -> None:
    plain = json.loads(text_chunk("a", 0).removeprefix("data: "))
    del plain["usage"]
    events = StreamReader().feed("data: " + json.dumps(plain))
    events += StreamReader().feed("data: " + json.dumps(plain))
    assert events == [Text("a", 1), Text("a", 1)]


def test_a_chat_chunk_reads_its_delta() -> None:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}],
    }
    assert StreamReader().feed("data: " + json.dumps(chunk)) == [Text("hi", 1)]


@pytest.mark.parametrize(
    ("wire", "reason"),
    [("stop", "stop"), ("length", "length"), ("abort", "cancelled"), ("repetition", "stop")],
)
def test_a_workers_finish_reasons_become_edgellms(wire: str, reason: FinishReason) -> None:
    *_, finished = read([text_chunk("", 1, wire), usage_chunk(1, 0), "data: [DONE]"])
    assert isinstance(finished, Finished)
    assert finished.finish_reason == reason


def test_an_error_event_is_a_failed_worker_and_names_a_splits_lost_stages() -> None:
    error = {"error": {"message": "Internal server error", "type": "InternalServerError"}}
    reader = StreamReader()
    reader.feed(text_chunk("Once", 1))
    with pytest.raises(WorkerFailedError, match="Internal server error"):
        reader.feed("data: " + json.dumps(error))
    lost = {"error": {"message": "lost", "type": "server_error", "lost_stages": ["h:1"]}}
    with pytest.raises(StagesLostError) as caught:
        StreamReader().feed("data: " + json.dumps(lost))
    assert caught.value.endpoints == ["h:1"]


def test_a_stream_done_without_a_finish_reason_is_a_failed_worker() -> None:
    reader = StreamReader()
    reader.feed(text_chunk("Once", 1))
    with pytest.raises(WorkerFailedError, match="without a finish reason"):
        reader.feed("data: [DONE]")


def test_an_event_that_is_not_json_is_a_failed_worker() -> None:
    with pytest.raises(WorkerFailedError, match="not JSON"):
        StreamReader().feed("data: {oops")


# Through a transport


def serve(answer: Callable[[httpx.Request], httpx.Response]) -> WorkerClient:
    return WorkerClient(httpx.MockTransport(answer))


def sse_answer(*lines: str) -> httpx.Response:
    body = "".join(f"{line}\n\n" for line in lines)
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


async def collect(
    client: WorkerClient, request: CompletionRequest | ChatCompletionRequest
) -> list[Any]:
    try:
        return [event async for event in client.stream(WORKER, request)]
    finally:
        await client.aclose()


def test_a_stream_asks_for_usage_on_every_chunk_at_the_endpoint_of_its_kind() -> None:
    asked: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        return sse_answer(text_chunk("a", 1, "length"), usage_chunk(1, 0), "data: [DONE]")

    chat = ChatCompletionRequest(model="m", messages=[Message(role="user", content="hi")])
    events = asyncio.run(collect(serve(answer), chat))
    assert [type(e) for e in events] == [Text, Finished]
    assert asked[0].url == f"{WORKER}/v1/chat/completions"
    body = json.loads(asked[0].content)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    completion = CompletionRequest(model="m", prompt="p", kv_from="http://a/v1/kv/x")
    asyncio.run(collect(serve(answer), completion))
    assert asked[1].url == f"{WORKER}/v1/completions"
    assert json.loads(asked[1].content)["kv_from"] == "http://a/v1/kv/x"


@pytest.mark.parametrize(
    ("status", "body", "kind", "says"),
    [
        (
            400,
            {"error": {"message": "maximum context length is 4096 tokens"}},
            WorkerRefusedError,
            "4096",
        ),
        (404, {"error": {"message": "The model `x` does not exist."}}, WorkerRefusedError, "`x`"),
        (502, "Bad Gateway", WorkerFailedError, "answered 502: Bad Gateway"),
        (503, {"error": {"message": "lost", "lost_stages": ["h:1"]}}, StagesLostError, "lost"),
    ],
)
def test_a_refusal_or_failure_before_streaming_is_the_error_that_says_what_to_do(
    status: int, body: Any, kind: type[Exception], says: str
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    with pytest.raises(kind, match=says) as caught:
        asyncio.run(collect(serve(answer), CompletionRequest(model="m", prompt="p")))
    assert type(caught.value) is kind
    if isinstance(caught.value, WorkerRefusedError):
        assert caught.value.status == status


def test_a_worker_gone_or_a_stream_cut_short_is_a_failed_worker_not_an_httpx_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(WorkerFailedError, match="connection refused"):
        asyncio.run(collect(serve(refuse), CompletionRequest(model="m", prompt="p")))

    def cut(request: httpx.Request) -> httpx.Response:
        return sse_answer(text_chunk("a", 1))

    with pytest.raises(WorkerFailedError, match="ended without finishing"):
        asyncio.run(collect(serve(cut), CompletionRequest(model="m", prompt="p")))


def test_no_free_connection_is_the_callers_saturation() -> None:
    def busy(request: httpx.Request) -> httpx.Response:
        raise httpx.PoolTimeout("no connection", request=request)

    with pytest.raises(ClientBusyError):
        asyncio.run(collect(serve(busy), CompletionRequest(model="m", prompt="p")))


def test_tokens_come_from_the_first_worker_that_answers_vllms_tokenize() -> None:
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        if request.url.host == "down":
            return httpx.Response(500, text="down")
        assert json.loads(request.content) == {"model": "m", "prompt": "hi"}
        return httpx.Response(200, json={"count": 2, "max_model_len": 2048, "tokens": [1, 7]})

    async def scenario() -> tuple[list[int] | None, list[int] | None]:
        client = serve(answer)
        request = TokenizeCompletionRequest(model="m", prompt="hi")
        try:
            first = await client.tokenize_first(["http://down", "http://up"], request)
            none = await client.tokenize_first(["http://down", "http://down", "http://up"], request)
        finally:
            await client.aclose()
        return first, none

    first, none = asyncio.run(scenario())
    assert first == [1, 7]
    assert none is None, "two tries, no more: this only informs a preference"
    assert asked[:2] == ["http://down/tokenize", "http://up/tokenize"]


def test_a_cancel_says_whether_the_generation_was_running() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.method == "DELETE"
        if request.url.path == "/v1/requests/running":
            return httpx.Response(204)
        return httpx.Response(404, json={"error": {"message": "no generation"}})

    async def scenario() -> tuple[bool, bool]:
        client = serve(answer)
        try:
            return await client.cancel(WORKER, "running"), await client.cancel(WORKER, "gone")
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == (True, False)
