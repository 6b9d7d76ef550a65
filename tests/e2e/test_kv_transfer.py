"""Prefill on one real llama.cpp worker, decode on another with its KV state, over real HTTP."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgellm.dev.cluster import free_port
from edgellm.worker.models import TINY, write_model
from tests.e2e.helpers import worker_process

PROMPT = "the federation shares blocks of the cache between home machines " * 12
OTHER = "hello world"
GREEDY = {"model": "tiny-random", "max_tokens": 16, "temperature": 0, "ignore_eos": True}


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
    body = {**GREEDY, "prompt": prompt, **fields}
    response = httpx.post(f"{worker}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _text(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["text"])


def _cached(answer: dict[str, Any]) -> int:
    return int(answer["usage"]["prompt_tokens_details"]["cached_tokens"])


def _prefill(worker: str, request_id: str, prompt: str = PROMPT) -> dict[str, Any]:
    body = {**GREEDY, "request_id": request_id, "prompt": prompt}
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
    assert _cached(scratch) <= 1, "only the BOS token is shared"
    _generate(decode_worker, OTHER)
    loaded_before = _transfers(decode_worker, "loaded")

    prefilled = _prefill(prefill_worker, "split-1")
    assert prefilled["prompt_tokens"] == scratch["usage"]["prompt_tokens"]
    assert prefilled["state_bytes"] > 0
    decoded = _generate(decode_worker, PROMPT, kv_from=f"{prefill_worker}/v1/kv/split-1")

    usage, transfer = decoded["usage"], decoded["kv_transfer"]
    assert _cached(decoded) == usage["prompt_tokens"] == prefilled["prompt_tokens"]
    assert transfer["bytes"] == prefilled["state_bytes"]
    assert transfer["tokens"] == prefilled["prompt_tokens"]
    assert _text(decoded) == _text(scratch)
    assert usage["completion_tokens"] == GREEDY["max_tokens"]
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
        decoded = _generate(decode_worker, PROMPT, kv_from=source)
        assert decoded.get("kv_transfer") is None, source
        assert decoded["usage"]["completion_tokens"] == GREEDY["max_tokens"]
        assert _transfers(decode_worker, "failed") == failed_before + 1, source


def _streamed(worker: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of a streamed completion, [DONE] left out."""
    with httpx.stream("POST", f"{worker}/v1/completions", json=body, timeout=60) as answer:
        return [
            json.loads(line.removeprefix("data: "))
            for line in answer.iter_lines()
            if line.startswith("data: {")
        ]


def test_the_stream_says_no_state_was_loaded(decode_worker: str) -> None:
    body = {
        **GREEDY,
        "prompt": PROMPT,
        "stream": True,
        "stream_options": {"include_usage": True},
        "kv_from": f"{decode_worker}/v1/kv/never-prefilled",
    }
    events = _streamed(decode_worker, body)
    *_, finishing, summary = events
    assert finishing["choices"][0]["finish_reason"] == "length"
    assert summary["usage"]["completion_tokens"] == GREEDY["max_tokens"]
    assert all("kv_transfer" not in event for event in events)


def test_the_stream_names_the_state_it_loaded(prefill_worker: str, decode_worker: str) -> None:
    _prefill(prefill_worker, "streamed")
    body = {
        **GREEDY,
        "prompt": PROMPT,
        "stream": True,
        "kv_from": f"{prefill_worker}/v1/kv/streamed",
    }
    events = _streamed(decode_worker, body)
    assert events[-1]["kv_transfer"]["source"] == "peer"
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_a_prefilled_state_is_handed_out_once(prefill_worker: str) -> None:
    prefilled = _prefill(prefill_worker, "once")
    first = httpx.get(f"{prefill_worker}/v1/kv/once")
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/octet-stream"
    assert len(first.content) == prefilled["state_bytes"]
    again = httpx.get(f"{prefill_worker}/v1/kv/once")
    assert again.status_code == 404
    assert again.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "x"}, "a prefill needs a request_id"),
        (
            {"request_id": "long", "prompt": "x", "max_tokens": 4000},
            "more than the model's context of 2048",
        ),
        ({"request_id": "none"}, "prompt: Field required"),
    ],
    ids=["no-id", "too-long", "no-prompt"],
)
def test_bad_prefills_get_an_openai_style_error(
    prefill_worker: str, body: dict[str, Any], message: str
) -> None:
    body = {"model": "tiny-random", **body}
    response = httpx.post(f"{prefill_worker}/v1/prefill", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert message in response.json()["error"]["message"]
