"""The worker's HTTP API, which the operator and the router call: generate (whole or streamed
as server-sent events), cancel, health and metrics.

`create_app(backend, model)` builds the app with its state on it (no globals); `edgellm worker`
serves it with uvicorn. Requests reuse the API's `SamplingParams` and `ChatMessage`, so a
worker accepts exactly what an InferenceRequest may say.
"""

import asyncio
import json
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import Field, ValidationError
from starlette.background import BackgroundTask

from edgellm.api import ChatMessage, PeerLoad, SamplingParams
from edgellm.api._common import Model
from edgellm.worker.kvevents import KVEvents
from edgellm.worker.llamacpp import LlamaCppBackend, Piece, PromptTooLongError, Sampling, Usage
from edgellm.worker.vllm import VllmBackend, VllmError


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


def _smooth(average: float, sample: float) -> float:
    """An exponential moving average, so one odd request does not swing the peer's figures."""
    return sample if average == 0 else 0.7 * average + 0.3 * sample


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """Errors in OpenAI's shape, which every client of this field already parses."""
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


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
        on_close: Callable[[str], None],
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
            self._on_close(self._reason)  # the model is idle: its state may be read
            self._turn.release()

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
        on_close: Callable[[str], None],
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


Backend = LlamaCppBackend | VllmBackend


@asynccontextmanager
async def _serving(backend: Backend) -> AsyncIterator[None]:
    """vLLM runs as a child process for as long as the app serves."""
    if isinstance(backend, VllmBackend):
        await backend.start()
    try:
        yield
    finally:
        if isinstance(backend, VllmBackend):
            await backend.stop()


def create_app(backend: Backend, model: str, kv_events: KVEvents | None = None) -> FastAPI:
    app = FastAPI(title="EdgeLLM worker", lifespan=lambda _: _serving(backend))
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
    if kv_events is not None:
        kv_events.publisher.publish([kv_events.tracker.clear()])

    load = PeerLoad()  # what the peer's heartbeat reports to the federation

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

    @app.post("/v1/generate", response_model=None)
    async def generate(request: Request) -> Response:
        try:
            body = GenerateRequest.model_validate(await request.json())
        except (ValidationError, ValueError) as e:
            return _error(400, str(e))
        if (body.prompt is None) == (body.messages is None):
            return _error(400, "exactly one of prompt or messages must be set")
        try:
            prompt = body.prompt or backend.chat_prompt(
                [m.model_dump() for m in body.messages or []]
            )
        except ValueError as e:
            return _error(400, str(e))
        sampling = Sampling(**{**body.sampling.model_dump(), "stop": tuple(body.sampling.stop)})
        cancelled = threading.Event()
        usage = Usage()

        def finish(reason: str) -> None:
            running.pop(body.id, None)
            tokens.inc(usage.completion_tokens)
            finished.labels(reason).inc()
            if usage.first_token_seconds:
                ttft.observe(usage.first_token_seconds)
                computed = usage.prompt_tokens - usage.cached_tokens
                rate = computed / usage.first_token_seconds
                load.prefill_tokens_per_second = round(
                    _smooth(load.prefill_tokens_per_second, rate), 1
                )
            decoding = time.monotonic() - started - (usage.first_token_seconds or 0.0)
            if usage.completion_tokens > 1 and decoding > 0:
                rate = usage.completion_tokens / decoding
                load.tokens_per_second = round(_smooth(load.tokens_per_second, rate), 1)
            if isinstance(backend, LlamaCppBackend):
                held = backend.context_tokens()
                load.kv_cache_usage = round(len(held) / backend.context, 3)
                if kv_events is not None:
                    kv_events.after_generation(held)

        if body.id:  # cancellable while it waits for the model, too
            running[body.id] = cancelled
        generation: Generation | StreamGeneration
        if isinstance(backend, VllmBackend):
            started = time.monotonic()
            stream = backend.stream(prompt + body.continuation, sampling, usage)
            generation = StreamGeneration(stream, cancelled, finish)
        else:
            # Waiting requests wait here, not in worker threads: threads blocked on the
            # model's lock would starve the one generation that holds it.
            try:
                await turn.acquire()
            except BaseException:  # the client left while it waited
                running.pop(body.id, None)
                raise
            started = time.monotonic()
            tokens_out = backend.generate(prompt, sampling, usage, cancelled, body.continuation)
            generation = Generation(tokens_out, cancelled, turn, finish)
        try:
            first = await generation.next()
        except PromptTooLongError as e:
            generation.close()
            return _error(400, str(e))
        except VllmError as e:
            generation.close()
            return _error(502, str(e), "server_error")
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
                },
            }

        if body.stream:

            async def events() -> AsyncIterator[str]:
                async with aclosing(pull()) as pieces:
                    async for piece in pieces:
                        if piece.text:
                            # With the count so far, a resumed request knows its token budget.
                            event = {"text": piece.text, "tokens": usage.completion_tokens}
                            yield f"data: {json.dumps(event)}\n\n"
                        if piece.finish_reason:
                            yield f"data: {json.dumps(summary(piece.finish_reason))}\n\n"
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
            async for piece in pieces:
                text.append(piece.text)
                reason = piece.finish_reason or reason
        return JSONResponse({"id": body.id, "text": "".join(text), **summary(reason)})

    return app
