"""Prefill on one real llama.cpp worker, decode on another with its KV state, over real HTTP."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgellm.dev.cluster import free_port
from edgellm.worker.models import TINY, write_model
from tests.e2e.conftest import worker_process

PROMPT = "the federation shares blocks of the cache between home machines " * 12
OTHER = "hello world"
GREEDY = {"maxTokens": 16, "temperature": 0, "ignoreEos": True}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny-random.gguf", TINY)


@pytest.fixture(scope="module")
def prefill_worker(model: Path) -> Iterator[str]:
    with worker_process(model) as worker:
        yield worker.url


@pytest.fixture(scope="module")
def decode_worker(model: Path) -> Iterator[str]:
    with worker_process(model) as worker:
        yield worker.url


def _generate(worker: str, prompt: str, **fields: Any) -> dict[str, Any]:
    body = {"prompt": prompt, "sampling": GREEDY, **fields}
    response = httpx.post(f"{worker}/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _prefill(worker: str, request_id: str, prompt: str = PROMPT) -> dict[str, Any]:
    body = {"id": request_id, "prompt": prompt, "sampling": GREEDY}
    response = httpx.post(f"{worker}/v1/prefill", json=body, timeout=60)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _transfers(worker: str, outcome: str) -> float:
    metric = f'edgellm_worker_kv_transfers_total{{outcome="{outcome}",source="peer"}}'
    text = httpx.get(f"{worker}/metrics").text
    return float(next(x for x in text.splitlines() if x.startswith(metric)).split()[-1])


def test_a_prompt_prefilled_elsewhere_decodes_as_if_computed_here(
    prefill_worker: str, decode_worker: str
) -> None:
    _generate(decode_worker, OTHER)  # whatever the decode worker held, it is not the prompt
    scratch = _generate(decode_worker, PROMPT)
    assert scratch["usage"]["cachedTokens"] <= 1, "only the BOS token is shared"
    _generate(decode_worker, OTHER)
    loaded_before = _transfers(decode_worker, "loaded")

    prefilled = _prefill(prefill_worker, "split-1")
    assert prefilled["promptTokens"] == scratch["usage"]["promptTokens"]
    assert prefilled["stateBytes"] > 0
    decoded = _generate(decode_worker, PROMPT, kvFrom=f"{prefill_worker}/v1/kv/split-1")

    usage = decoded["usage"]
    assert usage["cachedTokens"] == usage["promptTokens"] == prefilled["promptTokens"]
    assert usage["kvTransfer"]["bytes"] == prefilled["stateBytes"]
    assert usage["kvTransfer"]["tokens"] == prefilled["promptTokens"]
    assert decoded["text"] == scratch["text"]
    assert usage["completionTokens"] == GREEDY["maxTokens"]
    assert _transfers(decode_worker, "loaded") == loaded_before + 1


def test_a_state_that_cannot_be_had_or_loaded_is_recomputed_and_counted(
    prefill_worker: str, decode_worker: str
) -> None:
    _prefill(prefill_worker, "another-prompt", prompt=OTHER)
    sources = [
        f"{prefill_worker}/v1/kv/never-prefilled",
        f"http://127.0.0.1:{free_port()}/v1/kv/split-1",  # nothing listens there
        f"{prefill_worker}/v1/kv/another-prompt",  # a state, but not of this prompt
    ]
    for source in sources:
        failed_before = _transfers(decode_worker, "failed")
        decoded = _generate(decode_worker, PROMPT, kvFrom=source)
        assert decoded["usage"]["kvTransfer"] is None, source
        assert decoded["usage"]["completionTokens"] == GREEDY["maxTokens"]
        assert _transfers(decode_worker, "failed") == failed_before + 1, source


def test_the_stream_says_no_state_was_loaded(decode_worker: str) -> None:
    body = {
        "prompt": PROMPT,
        "sampling": GREEDY,
        "stream": True,
        "kvFrom": f"{decode_worker}/v1/kv/never-prefilled",
    }
    with httpx.stream("POST", f"{decode_worker}/v1/generate", json=body, timeout=60) as response:
        events = [
            json.loads(line.removeprefix("data: "))
            for line in response.iter_lines()
            if line.startswith("data: {")
        ]
    summary = events[-1]
    assert summary["finishReason"] == "length"
    assert summary["usage"]["kvTransfer"] is None


def test_a_prefilled_state_is_handed_out_once(prefill_worker: str) -> None:
    prefilled = _prefill(prefill_worker, "once")
    first = httpx.get(f"{prefill_worker}/v1/kv/once")
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/octet-stream"
    assert len(first.content) == prefilled["stateBytes"]
    again = httpx.get(f"{prefill_worker}/v1/kv/once")
    assert again.status_code == 404
    assert again.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "x"}, "a prefill needs an id"),
        (
            {"id": "long", "prompt": "x", "sampling": {"maxTokens": 4000}},
            "more than the model's context of 2048",
        ),
        ({"id": "none"}, "exactly one of prompt or messages must be set"),
    ],
    ids=["no-id", "too-long", "no-prompt"],
)
def test_bad_prefills_get_an_openai_style_error(
    prefill_worker: str, body: dict[str, Any], message: str
) -> None:
    response = httpx.post(f"{prefill_worker}/v1/prefill", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert message in response.json()["error"]["message"]
