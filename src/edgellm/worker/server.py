"""The worker's HTTP API, which the operator and the router call: generate (whole or streamed
as server-sent events), prefill and hand over KV state, cancel, health and metrics.

`create_app(backend, model)` builds the app with its state on it (no globals); `edgellm worker`
serves it with uvicorn. Requests reuse the API's `SamplingParams` and `ChatMessage`, so a
worker accepts exactly what an InferenceRequest may say.

Prefill/decode disaggregation between llama.cpp workers: the router sends the prompt to the
prefill worker's `/v1/prefill`, which computes its KV and keeps the state under the request's
id; then it asks the decode worker to generate with `kvFrom` set to the prefill worker's
`/v1/kv/{id}`. The decode worker fetches that state once it has the model's turn, loads it
and generates. A state it cannot have or load is only a lost shortcut: it computes the prompt.
(vLLM workers move KV with LMCache instead, and answer both with a 501.)

With IPFS (`ipfs_kv`, see `ipfskv.py`), the state of every long prompt is also saved to this
peer's Kubo in the background and announced: `GET /v1/kv/ipfs/{block_hash}` serves the signed
announcement, and a `kvFrom` naming such a URL loads the state through this worker's own Kubo.
"""

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import Field, ValidationError
from starlette.background import BackgroundTask

from edgellm.api import ChatMessage, PeerLoad, SamplingParams
from edgellm.api._common import Model
from edgellm.kvcache import ExternalBlockHash
from edgellm.worker.ipfskv import IPFSKV, IPFSKVError, Prefix, announced_block, announcement_json
from edgellm.worker.kvevents import KVEvents
from edgellm.worker.llamacpp import (
    KVStateError,
    LlamaCppBackend,
    Piece,
    PromptTooLongError,
    Sampling,
    Usage,
)
from edgellm.worker.split import SplitError, SplitLeader, SplitPlan, StageLostError
from edgellm.worker.vllm import VllmBackend, VllmError

logger = logging.getLogger(__name__)
T = TypeVar("T")

KV_FETCH_TIMEOUT: Final = httpx.Timeout(5.0, connect=2.0)
"""Per connect and per read: a prefill peer gone must not hold the model's turn for long."""


class GenerateRequest(Model):
    """What to generate: a prompt or a chat, with an InferenceRequest's sampling parameters."""

    id: str = Field(default="", max_length=253)
    """Names the generation for `DELETE /v1/generate/{id}`."""
    prompt: str | None = Field(default=None, min_length=1)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    continuation: str = ""
    """Text already generated for this prompt by a lost peer: generation goes on after it."""
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    stream: bool = False
    kv_from: str | None = Field(default=None, pattern=r"^https?://", max_length=2048)
    """The `/v1/kv/{id}` URL of the worker that prefilled this prompt, or a peer's
    `/v1/kv/ipfs/{block_hash}` announcement of a prefix's KV in IPFS: that KV is loaded rather
    than computed (llama.cpp workers of the same model only)."""
    split: SplitPlan | None = None
    """For a worker that leads a split model (`--split`): the peers and layers to run it on."""


@dataclass(frozen=True)
class Fetched:
    """A KV state fetched for a prompt, and whence: `tokens` of it begin the prompt (None: all)."""

    state: bytes
    seconds: float
    source: Literal["peer", "ipfs"]
    tokens: int | None = None
    manifest: str | None = None


class KVStore:
    """Prefilled KV states waiting for their decode worker, by request id.

    Bounded by count and bytes, the oldest dropped first, and by age: a state that nobody
    fetched (its decode peer died, or the router changed its mind) must not hold memory.
    """

    def __init__(
        self,
        max_states: int = 16,
        max_bytes: int = 1 << 30,
        ttl: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_states = max_states
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._states: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    def put(self, key: str, state: bytes) -> bool:
        """Keeps `state` under `key`, replacing what was there; False if it alone is too big."""
        if len(state) > self.max_bytes:
            return False
        self.take(key)
        self._states[key] = (self._clock(), state)
        self._bytes += len(state)
        self._expire()
        while len(self._states) > self.max_states or self._bytes > self.max_bytes:
            self._drop(next(iter(self._states)))
        return True

    def take(self, key: str) -> bytes | None:
        """The state under `key`, removed: each is fetched once."""
        self._expire()
        return self._drop(key) if key in self._states else None

    def _expire(self) -> None:
        oldest = self._clock() - self.ttl
        while self._states and next(iter(self._states.values()))[0] < oldest:
            self._drop(next(iter(self._states)))

    def _drop(self, key: str) -> bytes:
        _, state = self._states.pop(key)
        self._bytes -= len(state)
        return state

    def __len__(self) -> int:
        return len(self._states)


def _smooth(average: float, sample: float) -> float:
    """An exponential moving average, so one odd request does not swing the peer's figures."""
    return sample if average == 0 else 0.7 * average + 0.3 * sample


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """Errors in OpenAI's shape, which every client of this field already parses."""
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


async def _read(request: Request, backend: "Backend") -> tuple[GenerateRequest, str] | Response:
    """A generate or prefill request and its prompt text, or the 400 that refuses it."""
    try:
        body = GenerateRequest.model_validate(await request.json())
    except (ValidationError, ValueError) as e:
        return _error(400, str(e))
    if (body.prompt is None) == (body.messages is None):
        return _error(400, "exactly one of prompt or messages must be set")
    try:
        return body, body.prompt or backend.chat_prompt(
            [m.model_dump() for m in body.messages or []]
        )
    except ValueError as e:
        return _error(400, str(e))


async def _in_turn(turn: asyncio.Lock, work: Callable[[], T]) -> T:
    """Runs `work` in a thread while holding the model's turn. A caller cancelled meanwhile
    (its client gone) leaves the turn held until the thread has left the model."""
    await turn.acquire()
    step = asyncio.ensure_future(asyncio.to_thread(work))
    step.add_done_callback(lambda _: turn.release())
    return await asyncio.shield(step)


async def _download(url: str, limit: int) -> bytes:
    """The body of a GET, refused past `limit` bytes without reading the rest."""
    async with (
        httpx.AsyncClient(timeout=KV_FETCH_TIMEOUT) as http,
        http.stream("GET", url) as response,
    ):
        response.raise_for_status()
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise KVStateError(f"the KV state at {url} is over {limit} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


class Generation:
    """One generation while it holds the model's turn.

    `close` stops it and gives the turn back once its thread has left the model, however the
    request ended: finished, cancelled, or its client gone mid-token. It never awaits, because
    a task cancelled by a client's disconnect is cancelled again at each await of its cleanup.
    """

    def __init__(
        self,
        pieces: Iterator[Piece],
        cancelled: threading.Event,
        turn: asyncio.Lock,
        on_close: Callable[[str], "asyncio.Future[Any] | None"],
    ) -> None:
        self._pieces = pieces
        self._cancelled = cancelled
        self._turn = turn
        self._on_close = on_close
        self._step: asyncio.Future[Piece | None] | None = None
        self._reason = "cancelled"  # until a piece says otherwise
        self._closed = False

    async def next(self) -> Piece | None:
        """The next piece, None after the last; the first one checks the prompt's length."""
        self._step = asyncio.ensure_future(asyncio.to_thread(next, self._pieces, None))
        piece = await asyncio.shield(self._step)  # a cancelled caller leaves the thread be
        if piece is not None and piece.finish_reason:
            self._reason = piece.finish_reason
        return piece

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancelled.set()

        def release(_: object = None) -> None:
            # The model is idle: its state may be read, and `on_close` may go on reading it
            # in a thread (the future it returns), holding the turn until it is done.
            reading = self._on_close(self._reason)
            if reading is None:
                self._turn.release()
            else:
                reading.add_done_callback(lambda _: self._turn.release())

        if self._step is None or self._step.done():
            release()
        else:
            self._step.add_done_callback(release)


class StreamGeneration:
    """One generation of a backend that batches requests itself (vLLM): no turn to hold."""

    def __init__(
        self,
        pieces: AsyncGenerator[Piece, None],
        cancelled: threading.Event,
        on_close: Callable[[str], object],
    ) -> None:
        self._pieces = pieces
        self._cancelled = cancelled
        self._on_close = on_close
        self._reason = "cancelled"
        self._closed = False
        self._closing: asyncio.Future[None] | None = None

    async def next(self) -> Piece | None:
        if self._closed:
            return None
        if self._cancelled.is_set():
            self.close()
            return Piece("", "cancelled")
        piece = await anext(self._pieces, None)
        if piece is not None and piece.finish_reason:
            self._reason = piece.finish_reason
        return piece

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancelled.set()
        self._on_close(self._reason)
        # Closing the HTTP stream is what aborts the request in vLLM; in a task of its own,
        # as a cleanup must not await (see Generation).
        self._closing = asyncio.ensure_future(self._pieces.aclose())


Backend = LlamaCppBackend | VllmBackend | SplitLeader


def _split_error(error: SplitError) -> dict[str, Any]:
    """A split's failure as an error body: which stages were lost, for the scheduler."""
    lost = error.endpoints if isinstance(error, StageLostError) else []
    return {"error": {"message": str(error), "type": "split_error", "lostStages": lost}}


@asynccontextmanager
async def _serving(
    backend: Backend, ipfs_kv: IPFSKV | None, saves: set[asyncio.Task[None]]
) -> AsyncIterator[None]:
    """vLLM runs as a child process for as long as the app serves; saves to IPFS still
    running at the end are cancelled."""
    if ipfs_kv is not None:
        try:
            await ipfs_kv.start()
        except IPFSKVError as e:
            logger.warning("the pins of an earlier run are not counted: %s", e)
    if isinstance(backend, VllmBackend):
        await backend.start()
    try:
        yield
    finally:
        if isinstance(backend, VllmBackend | SplitLeader):
            await backend.stop()
        for task in saves:
            task.cancel()
        await asyncio.gather(*saves, return_exceptions=True)
        if ipfs_kv is not None:
            await ipfs_kv.aclose()


def create_app(
    backend: Backend,
    model: str,
    kv_events: KVEvents | None = None,
    kv_store: KVStore | None = None,
    ipfs_kv: IPFSKV | None = None,
) -> FastAPI:
    saves: set[asyncio.Task[None]] = set()  # kept, or the loop may collect them mid-save
    app = FastAPI(title="EdgeLLM worker", lifespan=lambda _: _serving(backend, ipfs_kv, saves))
    store = KVStore() if kv_store is None else kv_store
    running: dict[str, threading.Event] = {}
    turn = asyncio.Lock()  # one generation at a time: llama.cpp's context is single
    metrics = CollectorRegistry()
    tokens = Counter("edgellm_worker_generated_tokens", "Tokens generated.", registry=metrics)
    finished = Counter(
        "edgellm_worker_requests",
        "Generations finished, by why they stopped.",
        ["finish_reason"],
        registry=metrics,
    )
    ttft = Histogram(
        "edgellm_worker_time_to_first_token_seconds",
        "From request to first token.",
        registry=metrics,
    )
    kv_transfers = Counter(
        "edgellm_worker_kv_transfers",
        "KV states fetched for kvFrom, by whether they were loaded or the prompt computed"
        " instead, and whence: a prefill peer over HTTP, or IPFS.",
        ["outcome", "source"],
        registry=metrics,
    )
    for outcome in ("loaded", "failed"):
        for source in ("peer", "ipfs"):
            kv_transfers.labels(outcome, source)
    kv_transfer_bytes = Counter(
        "edgellm_worker_kv_transfer_bytes",
        "Bytes of KV state fetched from prefill peers.",
        registry=metrics,
    )
    ipfs_bytes = Counter(
        "edgellm_worker_ipfs_bytes",
        "Bytes of KV state stored in (put) or fetched through (get) this peer's IPFS daemon.",
        ["direction"],
        registry=metrics,
    )
    for direction in ("put", "get"):
        ipfs_bytes.labels(direction)
    ipfs_fetch_seconds = Histogram(
        "edgellm_worker_ipfs_fetch_duration_seconds",
        "From kvFrom to a KV state fetched through IPFS and checked, announcement included.",
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        registry=metrics,
    )
    ipfs_save_seconds = Histogram(
        "edgellm_worker_ipfs_save_duration_seconds",
        "From a prompt's KV state exported to it stored in IPFS and announced.",
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        registry=metrics,
    )
    if kv_events is not None:
        kv_events.publisher.publish([kv_events.tracker.clear()])

    load = PeerLoad()  # what the peer's heartbeat reports to the federation

    # Read at scrape time from the state above; the heartbeat reports the same numbers.
    def gauge(name: str, documentation: str, value: Callable[[], float]) -> None:
        Gauge(name, documentation, registry=metrics).set_function(value)

    gauge(
        "edgellm_worker_running_requests",
        "Generations holding the model now.",
        lambda: 1 if turn.locked() else 0,
    )
    gauge(
        "edgellm_worker_queued_requests",
        "Generations waiting for the model.",
        lambda: max(len(running) - (1 if turn.locked() else 0), 0),
    )
    gauge(
        "edgellm_worker_decode_tokens_per_second",
        "Smoothed decode speed of recent generations.",
        lambda: load.tokens_per_second,
    )
    gauge(
        "edgellm_worker_prefill_tokens_per_second",
        "Smoothed prefill speed of recent prompts (cached or loaded ones left out).",
        lambda: load.prefill_tokens_per_second,
    )
    gauge(
        "edgellm_worker_kv_cache_usage_ratio",
        "Share of the context's KV cache held after the last generation.",
        lambda: load.kv_cache_usage,
    )
    gauge(
        "edgellm_worker_kv_blocks",
        "KV blocks the context holds, as KV events announce them (0 without KV events).",
        lambda: len(kv_events.tracker.blocks) if kv_events is not None else 0,
    )

    def learn_prefill_rate(computed: int, seconds: float) -> None:
        if computed > 0:  # a prompt cached or loaded says nothing of the prefill speed
            rate = computed / seconds
            load.prefill_tokens_per_second = round(_smooth(load.prefill_tokens_per_second, rate), 1)

    def context_changed(llama: LlamaCppBackend) -> None:
        """Reports what the context now holds; called while the turn is held."""
        held = llama.context_tokens()
        load.kv_cache_usage = round(len(held) / llama.context, 3)
        if kv_events is not None:
            kv_events.after_generation(held)

    async def fetch_state(url: str, text: str) -> Fetched | None:
        """The KV state `url` names for the prompt `text`, from a prefill peer or through IPFS,
        or None (logged and counted)."""
        started = time.monotonic()
        if announced_block(url) is not None:
            if ipfs_kv is None:
                logger.warning("computing the prompt: %s is KV in IPFS, and no daemon is set", url)
                kv_transfers.labels("failed", "ipfs").inc()
                return None
            try:
                restored = await ipfs_kv.fetch(url, await backend.tokenize_async(text))
            except IPFSKVError as e:
                logger.warning("computing the prompt: no KV from IPFS via %s: %s", url, e)
                kv_transfers.labels("failed", "ipfs").inc()
                return None
            seconds = time.monotonic() - started
            ipfs_fetch_seconds.observe(seconds)
            ipfs_bytes.labels("get").inc(len(restored.state))
            return Fetched(restored.state, seconds, "ipfs", restored.tokens, restored.manifest)
        try:
            state = await _download(url, store.max_bytes)
        except (httpx.HTTPError, KVStateError) as e:
            logger.warning("computing the prompt: no KV state from %s: %s", url, e)
            kv_transfers.labels("failed", "peer").inc()
            return None
        kv_transfer_bytes.inc(len(state))
        return Fetched(state, time.monotonic() - started, "peer")

    def loading(
        llama: LlamaCppBackend,
        fetched: Fetched,
        text: str,
        transfer: dict[str, Any],
        pieces: Iterator[Piece],
    ) -> Iterator[Piece]:
        """Loads a fetched state into the context, then generates: in the generation's
        thread, as loading touches the model. A state refused is logged, and the prompt
        computed; `transfer` says what was loaded."""
        started = time.monotonic()
        try:
            loaded = llama.import_kv_state(fetched.state, llama.tokenize(text), fetched.tokens)
        except KVStateError as e:
            logger.warning("computing the prompt: its KV state was refused: %s", e)
            kv_transfers.labels("failed", fetched.source).inc()
        else:
            kv_transfers.labels("loaded", fetched.source).inc()
            seconds = fetched.seconds + time.monotonic() - started
            transfer.update(
                bytes=len(fetched.state),
                seconds=round(seconds, 4),
                tokens=loaded,
                source=fetched.source,
            )
            if fetched.manifest is not None:
                transfer["manifest"] = fetched.manifest
        yield from pieces

    def share(prefix: Prefix, state: Awaitable[bytes]) -> None:
        """Saves a prefix's KV state (being exported) to IPFS in the background."""
        assert ipfs_kv is not None

        async def save() -> None:
            try:
                data = await state
            except Exception:  # llama.cpp could not write its state: nothing to share
                ipfs_kv.release(prefix)
                logger.exception("not sharing a prompt's KV through IPFS: no state")
                return
            started = time.monotonic()
            try:
                announced = await ipfs_kv.save(prefix, data)
            except IPFSKVError as e:
                logger.warning("not sharing a prompt's KV through IPFS: %s", e)
                return
            ipfs_bytes.labels("put").inc(len(data))
            ipfs_save_seconds.observe(time.monotonic() - started)
            logger.info(
                "the KV of %d tokens (%d bytes) is in IPFS as %s after %.3f s",
                len(prefix.tokens),
                len(data),
                announced.manifest,
                time.monotonic() - started,
            )

        task = asyncio.ensure_future(save())
        saves.add(task)
        task.add_done_callback(saves.discard)

    def export_for_ipfs(llama: LlamaCppBackend, prompt_tokens: int) -> "asyncio.Future[Any] | None":
        """After a generation, while the turn is held: exports the state in a thread (the turn
        waits on the future returned) when the prompt is worth saving to IPFS."""
        if ipfs_kv is None:
            return None
        prefix = ipfs_kv.claim(llama.context_tokens()[:prompt_tokens])
        if prefix is None:
            return None
        exported = asyncio.ensure_future(asyncio.to_thread(llama.export_kv_state))
        share(prefix, exported)
        return exported

    @app.get("/healthz")
    def health() -> dict[str, Any]:
        load.running_requests = 1 if turn.locked() else 0
        load.queued_requests = max(len(running) - load.running_requests, 0)
        return {
            "model": model,
            "context": backend.context,
            "running": len(running),
            "load": load.to_wire(),
        }

    @app.get("/metrics")
    def export() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/tokenize", response_model=None)
    async def tokenize(request: Request) -> Response:
        """The prompt's tokens, for schedulers that look its KV blocks up in their index."""
        try:
            body = GenerateRequest.model_validate(await request.json())
            chat = [m.model_dump() for m in body.messages or []]
            prompt = body.prompt or backend.chat_prompt(chat)
        except (ValidationError, ValueError) as e:
            return _error(400, str(e))
        try:
            tokens = await backend.tokenize_async(prompt)
        except VllmError as e:
            return _error(502, str(e), "server_error")
        return JSONResponse({"tokens": tokens})

    @app.delete("/v1/generate/{request_id}")
    def cancel(request_id: str) -> Response:
        event = running.get(request_id)
        if event is None:
            return _error(404, f"no generation {request_id!r} is running", "not_found_error")
        event.set()
        return Response(status_code=204)

    @app.post("/v1/prefill", response_model=None)
    async def prefill(request: Request) -> Response:
        """Computes a prompt's KV and keeps its state for the decode worker's `kvFrom`."""
        if isinstance(backend, VllmBackend):
            return _error(501, "the vLLM backend moves KV with LMCache, not /v1/prefill")
        if isinstance(backend, SplitLeader):
            return _error(501, "a split model is prefilled and decoded by the same peers")
        read = await _read(request, backend)
        if isinstance(read, Response):
            return read
        body, prompt = read
        if not body.id:
            return _error(400, "a prefill needs an id: its KV state is fetched by it")
        llama = backend
        usage = Usage()

        def work() -> tuple[float, bytes, list[int]]:
            seconds = llama.prefill(prompt, body.sampling.max_tokens, usage, body.continuation)
            context_changed(llama)
            return seconds, llama.export_kv_state(), llama.context_tokens()

        try:
            seconds, state, held = await _in_turn(turn, work)
        except PromptTooLongError as e:
            return _error(400, str(e))
        learn_prefill_rate(usage.prompt_tokens - usage.cached_tokens, seconds)
        prefix = ipfs_kv.claim(held[: usage.prompt_tokens]) if ipfs_kv is not None else None
        if prefix is not None:
            exported = asyncio.get_running_loop().create_future()
            exported.set_result(state)
            share(prefix, exported)
        if not store.put(body.id, state):
            message = f"the KV state has {len(state)} bytes, over the {store.max_bytes} kept"
            return _error(507, message, "server_error")
        return JSONResponse(
            {
                "id": body.id,
                "promptTokens": usage.prompt_tokens,
                "cachedTokens": usage.cached_tokens,
                "prefillSeconds": round(seconds, 4),
                "stateBytes": len(state),
            }
        )

    @app.get("/v1/kv/ipfs/{block_hash}")
    async def ipfs_announcement(block_hash: str) -> Response:
        """The signed announcement of a chunk in this peer's IPFS that holds the block (as KV
        events name it), for another worker's `kvFrom`. Async: the announcements are the event
        loop's."""
        found = None
        if ipfs_kv is not None and block_hash.isdigit() and int(block_hash) < 1 << 64:
            found = ipfs_kv.announcement(ExternalBlockHash(int(block_hash)))
        if found is None:
            return _error(404, f"no KV in IPFS holds block {block_hash}", "not_found_error")
        return JSONResponse(announcement_json(found))

    @app.get("/v1/kv/{request_id}")
    async def kv_state(request_id: str) -> Response:
        """A prefilled KV state, once: fetching removes it. Async, as the store is the event
        loop's alone."""
        state = store.take(request_id)
        if state is None:
            return _error(404, f"no KV state {request_id!r} is kept", "not_found_error")
        return Response(state, media_type="application/octet-stream")

    @app.post("/v1/generate", response_model=None)
    async def generate(request: Request) -> Response:
        read = await _read(request, backend)
        if isinstance(read, Response):
            return read
        body, prompt = read
        if body.kv_from and isinstance(backend, VllmBackend):
            return _error(501, "the vLLM backend moves KV with LMCache, not kvFrom")
        if isinstance(backend, SplitLeader) != (body.split is not None):
            return _error(
                400,
                "this worker leads a split model: each generation needs its split plan"
                if isinstance(backend, SplitLeader)
                else "this worker serves its model whole; split plans go to a worker started"
                " with --split",
            )
        if body.kv_from and isinstance(backend, SplitLeader):
            return _error(501, "a split model computes its prompts itself, without kvFrom")
        sampling = Sampling(**{**body.sampling.model_dump(), "stop": tuple(body.sampling.stop)})
        cancelled = threading.Event()
        usage = Usage()
        transfer: dict[str, Any] = {}  # what kvFrom loaded: bytes, seconds, tokens

        def finish(reason: str) -> "asyncio.Future[Any] | None":
            running.pop(body.id, None)
            tokens.inc(usage.completion_tokens)
            finished.labels(reason).inc()
            if usage.first_token_seconds:
                ttft.observe(usage.first_token_seconds)
                computed = usage.prompt_tokens - usage.cached_tokens
                learn_prefill_rate(computed, usage.first_token_seconds)
            decoding = time.monotonic() - started - (usage.first_token_seconds or 0.0)
            if usage.completion_tokens > 1 and decoding > 0:
                rate = usage.completion_tokens / decoding
                load.tokens_per_second = round(_smooth(load.tokens_per_second, rate), 1)
            if isinstance(backend, LlamaCppBackend):
                context_changed(backend)
                return export_for_ipfs(backend, usage.prompt_tokens)
            return None

        if body.id:  # cancellable while it waits for the model, too
            running[body.id] = cancelled
        generation: Generation | StreamGeneration
        if isinstance(backend, VllmBackend):
            started = time.monotonic()
            stream = backend.stream(prompt + body.continuation, sampling, usage)
            generation = StreamGeneration(stream, cancelled, finish)
        elif isinstance(backend, SplitLeader):
            assert body.split is not None  # checked above
            started = time.monotonic()
            pieces = backend.stream(prompt, body.continuation, sampling, usage, body.split)
            generation = StreamGeneration(pieces, cancelled, finish)
        else:
            # Waiting requests wait here, not in worker threads: threads blocked on the
            # model's lock would starve the one generation that holds it.
            try:
                await turn.acquire()
            except BaseException:  # the client left while it waited
                running.pop(body.id, None)
                raise
            try:
                # Fetched once the model is ours, so waiting requests hold no states: the
                # prefill peer keeps it meanwhile.
                whole = prompt + body.continuation
                fetched = await fetch_state(body.kv_from, whole) if body.kv_from else None
            except BaseException:  # the client left while it was fetched
                running.pop(body.id, None)
                turn.release()
                raise
            started = time.monotonic()
            tokens_out: Iterator[Piece] = backend.generate(
                prompt, sampling, usage, cancelled, body.continuation
            )
            if fetched is not None:
                tokens_out = loading(backend, fetched, whole, transfer, tokens_out)
            generation = Generation(tokens_out, cancelled, turn, finish)
        try:
            first = await generation.next()
        except PromptTooLongError as e:
            generation.close()
            return _error(400, str(e))
        except VllmError as e:
            generation.close()
            return _error(502, str(e), "server_error")
        except SplitError as e:
            generation.close()
            return JSONResponse(_split_error(e), status_code=503)
        except BaseException:  # the client left before the first token
            generation.close()
            raise

        async def pull() -> AsyncGenerator[Piece, None]:
            piece = first
            try:
                while piece is not None:
                    yield piece
                    piece = await generation.next()
            finally:
                generation.close()  # a client gone mid-stream stops the generation

        def summary(finish_reason: str | None) -> dict[str, Any]:
            return {
                "finishReason": finish_reason,
                "usage": {
                    "promptTokens": usage.prompt_tokens,
                    "completionTokens": usage.completion_tokens,
                    "cachedTokens": usage.cached_tokens,
                    "firstTokenSeconds": usage.first_token_seconds,
                    "kvTransfer": transfer or None,
                },
            }

        if body.stream:

            async def events() -> AsyncIterator[str]:
                async with aclosing(pull()) as pieces:
                    try:
                        async for piece in pieces:
                            if piece.text:
                                # With the count so far, a resumed request knows its budget.
                                event = {"text": piece.text, "tokens": usage.completion_tokens}
                                yield f"data: {json.dumps(event)}\n\n"
                            if piece.finish_reason:
                                yield f"data: {json.dumps(summary(piece.finish_reason))}\n\n"
                    except SplitError as e:  # no finish reason: the caller resumes elsewhere
                        yield f"data: {json.dumps(_split_error(e))}\n\n"
                        return
                yield "data: [DONE]\n\n"

            async def close() -> None:  # async: starlette runs sync tasks in threads
                generation.close()

            # A client gone while its stream waits to send leaves `events` suspended, never
            # closed: the background task still closes the generation.
            return StreamingResponse(
                events(), media_type="text/event-stream", background=BackgroundTask(close)
            )

        text, reason = [], None
        async with aclosing(pull()) as pieces:
            try:
                async for piece in pieces:
                    text.append(piece.text)
                    reason = piece.finish_reason or reason
            except SplitError as e:
                return JSONResponse(_split_error(e), status_code=503)
        return JSONResponse({"id": body.id, "text": "".join(text), **summary(reason)})

    return app
