"""KV state handed from a prefill worker to a decode worker: what loads, what is refused, and
the prefill worker's bounded store of states waiting to be fetched."""

import asyncio
import json
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgellm.worker.backend import Sampling, Usage
from edgellm.worker.llamacpp import KVStateError, LlamaCppBackend
from edgellm.worker.llamaworker import KVStore
from edgellm.worker.models import TINY, write_model
from edgellm.worker.server import create_app
from edgellm.worker.vllm import VllmBackend, VllmSettings

PROMPT = "the federation shares blocks of the cache " * 8
GREEDY = Sampling(max_tokens=12, temperature=0, ignore_eos=True)
PREAMBLE = struct.Struct("<6sHI")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny-random.gguf", TINY)


@pytest.fixture(scope="module")
def prefill(model: Path) -> LlamaCppBackend:
    return LlamaCppBackend(model)


@pytest.fixture(scope="module")
def decode(model: Path) -> LlamaCppBackend:
    return LlamaCppBackend(model)


@pytest.fixture(scope="module")
def state(prefill: LlamaCppBackend) -> bytes:
    prefill.prefill(PROMPT, GREEDY.max_tokens, Usage())
    return prefill.export_kv_state()


def _generate(backend: LlamaCppBackend, prompt: str) -> tuple[str, Usage]:
    usage = Usage()
    pieces = backend.generate(prompt, GREEDY, usage, threading.Event())
    return "".join(p.text for p in pieces), usage


def _rewrite(state: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """The state with its header changed by `change`, otherwise well formed."""
    magic, version, length = PREAMBLE.unpack_from(state)
    header = json.loads(state[PREAMBLE.size : PREAMBLE.size + length])
    change(header)
    encoded = json.dumps(header).encode()
    return PREAMBLE.pack(magic, version, len(encoded)) + encoded + state[PREAMBLE.size + length :]


def test_a_state_loaded_generates_what_the_decode_worker_computes_itself(
    decode: LlamaCppBackend, state: bytes
) -> None:
    own, computed = _generate(decode, PROMPT)
    assert computed.cached_tokens == 0
    _generate(decode, "hello world")  # the context no longer holds the prompt
    loaded = decode.import_kv_state(state, decode.tokenize(PROMPT))
    assert loaded == computed.prompt_tokens
    text, usage = _generate(decode, PROMPT)
    assert usage.cached_tokens == computed.prompt_tokens
    assert text == own


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda header: header.__setitem__(key, value)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: s[:8], "too few"),
        (lambda s: s[:40], "cut short in its header"),
        (lambda s: s[:-1], "bytes, not"),
        (lambda s: b"PICKLE" + s[6:], "not an EdgeLLM KV state"),
        (lambda s: s[:6] + struct.pack("<H", 2) + s[8:], "KV state format 2"),
        (lambda s: s[:20] + b"}" + s[21:], "header is malformed"),
        (lambda s: _rewrite(s, lambda h: h.pop("tokens")), "header is malformed"),
        (lambda s: _rewrite(s, _set("model", {"name": "tiny-random"})), "another model"),
        (lambda s: _rewrite(s, _set("nTokens", 3)), "tokens are not of this model"),
        (lambda s: _rewrite(s, _set("tokens", [1, -5])), "tokens are not of this model"),
        (lambda s: _rewrite(s, _set("stateBytes", 10)), "bytes, not 10"),
        (lambda s: s[:-100] + bytes(100), "CRC-32 does not match"),
    ],
    ids=[
        "truncated-preamble",
        "truncated-header",
        "truncated-state",
        "magic",
        "version",
        "header-json",
        "header-field-missing",
        "model",
        "token-count",
        "token-ids",
        "state-size",
        "state-bytes",
    ],
)
def test_a_damaged_state_is_refused_and_the_context_kept(
    decode: LlamaCppBackend,
    state: bytes,
    corrupt: Callable[[bytes], bytes],
    message: str,
) -> None:
    _generate(decode, "hello world")
    held = decode.context_tokens()
    with pytest.raises(KVStateError, match=message):
        decode.import_kv_state(corrupt(state), decode.tokenize(PROMPT))
    assert decode.context_tokens() == held


def test_a_state_of_another_prompt_is_refused(decode: LlamaCppBackend, state: bytes) -> None:
    with pytest.raises(KVStateError, match="another prompt"):
        decode.import_kv_state(state, decode.tokenize("a different prompt entirely"))


def test_a_state_of_the_same_shape_with_other_weights_is_refused(
    tmp_path: Path, state: bytes
) -> None:
    other = LlamaCppBackend(write_model(tmp_path / "tiny-random.gguf", TINY, seed=1))
    with pytest.raises(KVStateError, match="another model"):
        other.import_kv_state(state, other.tokenize(PROMPT))


def test_the_store_hands_each_state_out_once() -> None:
    store = KVStore()
    assert store.put("a", b"state")
    assert store.take("a") == b"state"
    assert store.take("a") is None


def test_the_store_drops_the_oldest_states_past_its_count_or_bytes() -> None:
    store = KVStore(max_states=2, max_bytes=10)
    for key in "abc":
        store.put(key, b"xxx")
    assert store.take("a") is None
    assert store.put("d", b"yyyyyyy")  # 3 + 3 + 7 bytes: b goes too
    assert (store.take("b"), store.take("c"), store.take("d")) == (None, b"xxx", b"yyyyyyy")
    assert not store.put("e", bytes(11)), "larger than the whole store"


def test_the_store_forgets_states_nobody_fetched_within_its_ttl() -> None:
    now = [0.0]
    store = KVStore(ttl=60, clock=lambda: now[0])
    store.put("stale", b"state")
    now[0] = 30
    store.put("fresh", b"state")
    now[0] = 61
    assert store.take("stale") is None
    assert store.take("fresh") == b"state"
    assert len(store) == 0


def test_a_vllm_worker_refuses_prefill_and_kv_from_as_not_implemented(tmp_path: Path) -> None:
    """LMCache moves a vLLM worker's KV; vLLM is not started, as neither request reaches it."""
    settings = VllmSettings.model_validate({"model": "m", "servedModelName": "m"})
    app = create_app(VllmBackend(settings, tmp_path), "m")
    prompt = {"model": "m", "prompt": "hi"}
    kv_from = {**prompt, "kv_from": "http://127.0.0.1:1/v1/kv/x"}

    async def post(path: str, body: dict[str, Any]) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as http:
            return await http.post(path, json=body)

    prefill = {**prompt, "request_id": "x"}
    for path, body in (("/v1/prefill", prefill), ("/v1/completions", kv_from)):
        response = asyncio.run(post(path, body))
        assert response.status_code == 501
        assert "LMCache" in response.json()["error"]["message"]
