"""`edgellm worker` serving the generated model with real llama.cpp, over real HTTP."""

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import zmq

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
from tests.e2e.conftest import worker_process

CHAT = {"messages": [{"role": "user", "content": "Why pool home GPUs?"}]}
GREEDY = {"maxTokens": 16, "temperature": 0}


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


def test_a_chat_is_answered_with_usage_and_repeats_at_temperature_zero(worker: str) -> None:
    first = httpx.post(
        f"{worker}/v1/generate", json={**CHAT, "sampling": GREEDY}, timeout=60
    ).json()
    again = httpx.post(
        f"{worker}/v1/generate", json={**CHAT, "sampling": GREEDY}, timeout=60
    ).json()
    assert first["text"]
    assert first["text"] == again["text"]
    assert first["finishReason"] == "length"
    assert first["usage"]["completionTokens"] == 16
    assert first["usage"]["promptTokens"] > 5
    assert again["usage"]["cachedTokens"] >= first["usage"]["promptTokens"] - 1, "prefix reused"


def test_streaming_yields_the_same_text_token_by_token(worker: str) -> None:
    whole = httpx.post(
        f"{worker}/v1/generate", json={**CHAT, "sampling": GREEDY}, timeout=60
    ).json()
    texts, summary = [], {}
    body = {**CHAT, "sampling": GREEDY, "stream": True}
    with httpx.stream("POST", f"{worker}/v1/generate", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "text" in event:
                texts.append(event["text"])
            else:
                summary = event
    assert len(texts) > 1
    assert "".join(texts) == whole["text"]
    assert summary["finishReason"] == "length"


def test_a_cancelled_generation_stops_early(slow_worker: str) -> None:
    # Greedy, so the random model cannot end early by sampling its end-of-sequence token.
    greedy = {"maxTokens": 4000, "temperature": 0}
    body = {"id": "cancel-me", "prompt": "hello", "sampling": greedy, "stream": True}
    received: list[str] = []
    with httpx.stream("POST", f"{slow_worker}/v1/generate", json=body, timeout=120) as response:
        for line in response.iter_lines():
            received.append(line)
            if len(received) == 1:
                assert httpx.delete(f"{slow_worker}/v1/generate/cancel-me").status_code == 204
    summaries = [json.loads(x[6:]) for x in received if x.startswith('data: {"finishReason')]
    assert summaries[0]["finishReason"] == "cancelled"
    assert summaries[0]["usage"]["completionTokens"] < 100
    assert httpx.delete(f"{slow_worker}/v1/generate/cancel-me").status_code == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "x", "sampling": {"maxTokens": 4000}}, "more than the model's context of 2048"),
        ({"sampling": {}}, "exactly one of prompt or messages must be set"),
        ({"prompt": "x", "sampling": {"temperature": 9}}, "less than or equal to 2"),
        ({"prompt": "x", "promt": "typo"}, "promt"),
    ],
    ids=["too-long", "no-prompt", "temperature", "unknown-field"],
)
def test_bad_requests_get_an_openai_style_error(
    worker: str, body: dict[str, object], message: str
) -> None:
    response = httpx.post(f"{worker}/v1/generate", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert message in response.json()["error"]["message"]


def test_metrics_count_generated_tokens(worker: str) -> None:
    text = httpx.get(f"{worker}/metrics").text
    line = next(
        x for x in text.splitlines() if x.startswith("edgellm_worker_generated_tokens_total")
    )
    assert float(line.split()[-1]) > 0


def test_many_concurrent_requests_all_finish(worker: str) -> None:
    """More requests than the server has threads: waiting ones must not starve the one
    generating."""
    body = {**CHAT, "sampling": {"maxTokens": 8, "temperature": 0}}
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(
            pool.map(lambda _: http.post(f"{worker}/v1/generate", json=body), range(16))
        )
    assert [r.status_code for r in responses] == [200] * 16
    assert len({r.json()["text"] for r in responses}) == 1


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
        sub.subscribe(b"kv-events")

        def stored(prompt: str) -> list[KVEvent]:
            """Generates until a batch arrives: a SUB misses what precedes its subscription."""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                body = {"prompt": prompt, "sampling": {"maxTokens": 4, "temperature": 0}}
                httpx.post(f"{worker.url}/v1/generate", json=body, timeout=60)
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
