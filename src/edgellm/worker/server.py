"""The worker's HTTP API, which the operator and the router call: generate (whole or streamed
as server-sent events), cancel, health and metrics.

`create_app(backend, model)` builds the app with its state on it (no globals); `edgellm worker`
serves it with uvicorn. Requests reuse the API's `SamplingParams` and `ChatMessage`, so a
worker accepts exactly what an InferenceRequest may say.
"""

import asyncio
import json
import threading
from collections.abc import AsyncIterator
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

from edgellm.api import ChatMessage, SamplingParams
from edgellm.api._common import Model
from edgellm.worker.llamacpp import LlamaCppBackend, Piece, PromptTooLongError, Sampling, Usage


class GenerateRequest(Model):
    """What to generate: a prompt or a chat, with an InferenceRequest's sampling parameters."""

    id: str = Field(default="", max_length=253)
    """Names the generation for `DELETE /v1/generate/{id}`."""
    prompt: str | None = Field(default=None, min_length=1)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    stream: bool = False


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """Errors in OpenAI's shape, which every client of this field already parses."""
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def create_app(backend: LlamaCppBackend, model: str) -> FastAPI:
    app = FastAPI(title="EdgeLLM worker")
    running: dict[str, threading.Event] = {}
    turn = asyncio.Lock()  # one generation at a time: llama.cpp's context is single
    metrics = CollectorRegistry()
    tokens = Counter("edgellm_worker_generated_tokens", "Tokens generated.", registry=metrics)
    ttft = Histogram(
        "edgellm_worker_time_to_first_token_seconds",
        "From request to first token.",
        registry=metrics,
    )

    @app.get("/healthz")
    def health() -> dict[str, Any]:
        return {"model": model, "context": backend.context, "running": len(running)}

    @app.get("/metrics")
    def export() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

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
        prompt = body.prompt or backend.chat_prompt([m.model_dump() for m in body.messages or []])
        s = body.sampling
        sampling = Sampling(
            s.max_tokens,
            s.temperature,
            s.top_p,
            s.top_k,
            s.seed,
            tuple(s.stop),
            s.presence_penalty,
            s.frequency_penalty,
        )
        cancelled = threading.Event()
        usage = Usage()
        pieces = backend.generate(prompt, sampling, usage, cancelled)
        if body.id:  # cancellable while it waits for the model, too
            running[body.id] = cancelled
        # Waiting requests wait here, not in worker threads: threads blocked on the model's
        # lock would starve the one generation that holds it.
        await turn.acquire()
        try:
            first = await asyncio.to_thread(next, pieces, None)  # validates the prompt's length
        except PromptTooLongError as e:
            turn.release()
            running.pop(body.id, None)
            return _error(400, str(e))
        except BaseException:  # the client left before the first token
            cancelled.set()
            turn.release()
            running.pop(body.id, None)
            raise

        async def pull() -> AsyncIterator[Piece]:
            piece, step = first, None
            try:
                while piece is not None:
                    yield piece
                    step = asyncio.ensure_future(asyncio.to_thread(next, pieces, None))
                    piece = await asyncio.shield(step)
            finally:
                cancelled.set()  # a client gone mid-stream stops the generation
                if step is not None and not step.done():
                    await asyncio.wait({step})  # the model is free only once its token is out
                turn.release()
                running.pop(body.id, None)
                tokens.inc(usage.completion_tokens)
                if usage.first_token_seconds is not None:
                    ttft.observe(usage.first_token_seconds)

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
                async for piece in pull():
                    if piece.text:
                        yield f"data: {json.dumps({'text': piece.text})}\n\n"
                    if piece.finish_reason:
                        yield f"data: {json.dumps(summary(piece.finish_reason))}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        text, reason = [], None
        async for piece in pull():
            text.append(piece.text)
            reason = piece.finish_reason or reason
        return JSONResponse({"id": body.id, "text": "".join(text), **summary(reason)})

    return app
