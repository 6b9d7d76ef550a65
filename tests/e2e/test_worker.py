"""`edgellm worker` serving the generated model with real llama.cpp, over real HTTP."""

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import zmq
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from edgellm.dev.cluster import free_port
from edgellm.kvcache import (
    BlockRemoved,
    BlockStored,
    KVEvent,
    block_hashes,
    decode_batch,
    external_hash,
)
from edgellm.worker.llamacpp import LlamaCppBackend
from edgellm.worker.models import BENCH, TINY, write_model
from tests.e2e.helpers import worker_process

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Why pool home GPUs?"}]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with worker_process(
        write_model(tmp_path_factory.mktemp("models") / "tiny-random.gguf", TINY)
    ) as worker:
        yield worker.url


@pytest.fixture(scope="module")
def slow_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bench model: slow enough on a CPU that a long generation is still running when
    the test cancels it."""
    with worker_process(
        write_model(tmp_path_factory.mktemp("models") / "bench-random.gguf", BENCH)
    ) as worker:
        yield worker.url


def test_health_names_the_model_its_context_and_its_load(worker: str) -> None:
    health = httpx.get(f"{worker}/healthz").json()
    assert health["model"] == "tiny-random"
    assert health["context"] == TINY.context
    assert health["running"] == 0
    assert health["load"]["runningRequests"] == 0
    assert health["load"]["queuedRequests"] == 0


def _openai(worker: str) -> OpenAI:
    return OpenAI(base_url=f"{worker}/v1", api_key="unused", max_retries=0)


def test_a_chat_is_answered_with_usage_and_repeats_at_temperature_zero(worker: str) -> None:
    client = _openai(worker)
    first, again = (
        client.chat.completions.create(
            model="tiny-random", messages=CHAT, max_tokens=16, temperature=0
        )
        for _ in range(2)
    )
    assert first.choices[0].message.content
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].finish_reason == "length"
    assert first.usage is not None
    assert again.usage is not None
    assert again.usage.prompt_tokens_details is not None
    assert first.usage.completion_tokens == 16
    assert first.usage.prompt_tokens > 5
    cached = again.usage.prompt_tokens_details.cached_tokens or 0
    assert cached >= first.usage.prompt_tokens - 1, "prefix reused"


def test_streaming_yields_the_same_text_token_by_token(worker: str) -> None:
    client = _openai(worker)
    whole = client.chat.completions.create(
        model="tiny-random", messages=CHAT, max_tokens=16, temperature=0
    )
    texts, reasons, usage = [], [], None
    for chunk in client.chat.completions.create(
        model="tiny-random",
        messages=CHAT,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=16,
        temperature=0,
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert len([t for t in texts if t]) > 1
    assert "".join(texts) == whole.choices[0].message.content
    assert reasons[-1] == "length"
    assert usage is not None
    assert usage.completion_tokens == 16


def test_a_chat_goes_on_from_the_assistants_unfinished_last_message(worker: str) -> None:
    """How a request resumed on another worker goes on from the text a lost one generated
    (vLLM's continue_final_message; a plain prompt just carries the text)."""
    client = _openai(worker)
    bare = httpx.post(f"{worker}/tokenize", json={"messages": CHAT}, timeout=30).json()
    resumed = client.chat.completions.create(
        model="tiny-random",
        messages=[*CHAT, {"role": "assistant", "content": "the federation shares"}],
        max_tokens=4,
        temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert resumed.usage is not None
    assert resumed.usage.prompt_tokens > bare["count"], "the text so far is in its prompt"
    assert resumed.usage.completion_tokens == 4
    refused = httpx.post(
        f"{worker}/v1/chat/completions",
        json={"model": "tiny-random", "messages": CHAT, "continue_final_message": True},
        timeout=30,
    )
    assert refused.status_code == 400
    assert "continue_final_message" in refused.json()["error"]["message"]


def test_models_and_tokenize_answer_as_vllm_does(worker: str) -> None:
    models = _openai(worker).models.list()
    assert [m.id for m in models.data] == ["tiny-random"]
    assert models.data[0].model_extra == {"max_model_len": TINY.context}
    tokenized = httpx.post(f"{worker}/tokenize", json={"prompt": "hello world"}, timeout=30)
    body = tokenized.json()
    assert body["count"] == len(body["tokens"]) > 1
    assert body["max_model_len"] == TINY.context
    answer = _openai(worker).completions.create(
        model="tiny-random", prompt="hello world", max_tokens=1
    )
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == body["count"], "the tokens it computes the prompt as"


def test_a_cancelled_generation_stops_early(slow_worker: str) -> None:
    # Greedy, so the random model cannot end early by sampling its end-of-sequence token.
    body = {
        "model": "bench-random",
        "prompt": "hello",
        "max_tokens": 4000,
        "temperature": 0,
        "request_id": "cancel-me",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    received: list[str] = []
    with httpx.stream("POST", f"{slow_worker}/v1/completions", json=body, timeout=120) as answer:
        for line in answer.iter_lines():
            received.append(line)
            if len(received) == 1:
                cancel = httpx.delete(f"{slow_worker}/v1/requests/cancel-me")
                assert cancel.status_code == 204
    events = [json.loads(x[6:]) for x in received if x.startswith("data: {")]
    reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert reasons == ["abort"], "vLLM's word for a cancelled generation"
    assert events[-1]["usage"]["completion_tokens"] < 100
    assert httpx.delete(f"{slow_worker}/v1/requests/cancel-me").status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (
            "/v1/completions",
            {"prompt": "x", "max_tokens": 4000},
            "more than the model's context of 2048",
        ),
        ("/v1/completions", {}, "prompt: Field required"),
        ("/v1/chat/completions", {"messages": []}, "messages: List should have at least 1 item"),
        ("/v1/completions", {"prompt": "x", "temperature": 9}, "less than or equal to 2"),
        ("/v1/completions", {"promt": "typo"}, "prompt: Field required"),
        ("/v1/completions", {"prompt": "x", "split": {"context": 512}}, "split.leader_layers"),
    ],
    ids=["too-long", "no-prompt", "no-messages", "temperature", "misspelled", "bad-split"],
)
def test_bad_requests_get_an_openai_style_error(
    worker: str, path: str, body: dict[str, object], message: str
) -> None:
    response = httpx.post(f"{worker}{path}", json={"model": "tiny-random", **body}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert message in response.json()["error"]["message"]


def test_fields_a_worker_does_not_know_are_ignored_as_vllm_ignores_them(worker: str) -> None:
    # vllm-router, for one, sends fields of its own (SGLang's no_stop_trim).
    body = {"model": "tiny-random", "prompt": "x", "max_tokens": 2, "no_stop_trim": False}
    answer = httpx.post(f"{worker}/v1/completions", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 2


def test_a_split_plan_is_refused_by_a_worker_serving_its_model_whole(worker: str) -> None:
    split = {"context": 512, "leader_layers": 1, "stages": [{"endpoint": "h:1", "layers": 1}]}
    body = {"model": "tiny-random", "prompt": "x", "split": split}
    response = httpx.post(f"{worker}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert "split plans go to a worker started with --split" in response.json()["error"]["message"]


def _generated_tokens(worker: str) -> float:
    text = httpx.get(f"{worker}/metrics").text
    line = next(
        x for x in text.splitlines() if x.startswith("edgellm_worker_generated_tokens_total")
    )
    return float(line.split()[-1])


def test_metrics_count_generated_tokens(worker: str) -> None:
    before = _generated_tokens(worker)
    _openai(worker).completions.create(
        model="tiny-random", prompt="hello", max_tokens=16, temperature=0
    )
    assert _generated_tokens(worker) == before + 16


def test_many_concurrent_requests_all_finish(worker: str) -> None:
    """More requests than the server has threads: waiting ones must not starve the one
    generating."""
    body = {"model": "tiny-random", "messages": CHAT, "max_tokens": 8, "temperature": 0}
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(
            pool.map(lambda _: http.post(f"{worker}/v1/chat/completions", json=body), range(16))
        )
    assert [r.status_code for r in responses] == [200] * 16
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1


def test_kv_events_name_the_blocks_the_context_holds_as_vllm_would(
    tmp_path: Path,
) -> None:
    model = write_model(tmp_path / "tiny-random.gguf", TINY)
    port = free_port()
    tokenizer = LlamaCppBackend(model)
    prompts = ["the federation shares blocks " * 8, "a different prompt entirely " * 8]
    with (
        worker_process(model, f"--kv-events=tcp://*:{port}", "--hash-seed=7") as worker,
        zmq.Context() as context,
        context.socket(zmq.SUB) as sub,
    ):
        sub.connect(f"tcp://127.0.0.1:{port}")
        sub.subscribe(b"")  # vLLM's default topic, as the worker's

        def stored(prompt: str) -> list[KVEvent]:
            """Generates until a batch arrives: a SUB misses what precedes its subscription."""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                body = {"model": "tiny-random", "prompt": prompt, "max_tokens": 4, "temperature": 0}
                httpx.post(f"{worker.url}/v1/completions", json=body, timeout=60)
                if sub.poll(1000):
                    return decode_batch(sub.recv_multipart()[2]).events
            raise AssertionError("no KV events within 30 s")

        first = stored(prompts[0])
        blocks = [e for e in first if isinstance(e, BlockStored)]
        assert blocks, first
        tokens = [t for e in blocks for t in e.token_ids]
        prompt_tokens = tokenizer.tokenize(prompts[0])
        full = len(prompt_tokens) // 16 * 16
        assert tokens[:full] == prompt_tokens[:full]
        expected = block_hashes(tokens, 16, seed="7")
        assert [h for e in blocks for h in e.block_hashes] == [external_hash(h) for h in expected]

        second = stored(prompts[1])
        removed = [h for e in second if isinstance(e, BlockRemoved) for h in e.block_hashes]
        assert removed, "blocks of the first prompt that the second replaced"
        assert set(removed) <= {external_hash(h) for h in expected}
