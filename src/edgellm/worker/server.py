"""The worker's HTTP API: OpenAI's completions and chat completions (whole, or streamed as
server-sent events), `/v1/models`, vLLM's `/tokenize`, and EdgeLLM's extensions (cancelling by
request id, prefill and KV hand-over, health and metrics); `edgellm.workerapi.protocol` defines
every body.

`create_app(backend, model)` builds the app with its state on it (`app.state.worker`, no
globals); the routes are functions of this module that read it, and errors are answered by
`exception_handlers` in OpenAI's shape, as starlette's `applications.py` wires them. `edgellm
worker` serves it with uvicorn. The routes know backends only through `backend.Backend`.
"""

import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.background import BackgroundTask

from edgellm.worker.backend import (
    Backend,
    Generation,
    GenerationJob,
    InvalidJobError,
    NoRoomError,
    Piece,
    PromptTooLongError,
    Run,
    Sampling,
    UnsupportedError,
    Usage,
)
from edgellm.worker.metrics import WorkerMetrics
from edgellm.workerapi import protocol
from edgellm.workerapi.errors import StagesLostError, WorkerFailedError, WorkerRefusedError
from edgellm.workerapi.protocol import (
    DONE,
    Answering,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorDetail,
    ErrorResponse,
    GenerationRequest,
    Message,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    error_response,
    invalid_request,
    sse,
)

logger = logging.getLogger(__name__)

# EdgeLLM's finish reasons as a worker answers them: vLLM's words.
_WIRE_FINISH = {"stop": "stop", "length": "length", "cancelled": "abort"}


@dataclass
class Serving:
    """What the routes share: the backend, the model's name, the metrics, and the generations
    running now (by request id, with the event that cancels each)."""

    backend: Backend
    model: str
    metrics: WorkerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    running: dict[str, threading.Event] = field(default_factory=dict)

    def busy(self) -> tuple[int, int]:
        """Generations computing now, and those waiting their turn."""
        computing = self.backend.running(len(self.running))
        return computing, max(len(self.running) - computing, 0)


def _serving(request: Request) -> Serving:
    serving: Serving = request.app.state.worker
    return serving


async def health(request: Request) -> dict[str, Any]:
    serving = _serving(request)
    return {
        "model": serving.model,
        "context": serving.backend.context,
        "running": len(serving.running),
        "load": serving.metrics.report().to_wire(),
    }


async def alive(request: Request) -> Response:
    """vLLM's `/health`: 200 while the server serves (routers made for vLLM wait on it)."""
    return Response(status_code=200)


async def export_metrics(request: Request) -> Response:
    registry = _serving(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def models(request: Request) -> ModelList:
    serving = _serving(request)
    context = serving.backend.context or None
    card = ModelCard(id=serving.model, created=serving.created, max_model_len=context)
    return ModelList(data=[card])


async def tokenize(request: Request, body: TokenizeRequest) -> TokenizeResponse:
    """The prompt's tokens as this worker computes it, for schedulers that look its KV blocks
    up in their index."""
    backend = _serving(request).backend
    if isinstance(body, TokenizeChatRequest):
        text = _chat_text(backend, _messages(body.messages))
    else:
        text = body.prompt
    tokens = await backend.tokenize(text)
    return TokenizeResponse(count=len(tokens), max_model_len=backend.context, tokens=tokens)


async def cancel(request: Request, request_id: str) -> Response:
    event = _serving(request).running.get(request_id)
    if event is None:
        return error_response(404, f"no generation {request_id!r} is running", "not_found_error")
    event.set()
    return Response(status_code=204)


async def completions(request: Request, body: CompletionRequest) -> Response:
    return await _generate(_serving(request), body, body.text)


async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    serving = _serving(request)
    return await _generate(serving, body, _chat_prompt(serving.backend, body))


async def prefill(request: Request) -> Response:
    """Computes a prompt's KV and keeps its state for the decode worker's `kv_from`."""
    serving = _serving(request)
    raw = await request.json()
    try:
        body: GenerationRequest = (
            ChatCompletionRequest.model_validate(raw)
            if isinstance(raw, dict) and "messages" in raw
            else CompletionRequest.model_validate(raw)
        )
    except ValidationError as e:
        return invalid_request(e.errors())
    if not body.request_id:
        return error_response(400, "a prefill needs a request_id: its KV state is fetched by it")
    text = (
        _chat_prompt(serving.backend, body)
        if isinstance(body, ChatCompletionRequest)
        else body.text
    )
    prefilled = await serving.backend.prefill(_job(body, text, body.request_id))
    return JSONResponse(prefilled.model_dump())


async def kv_state(request: Request, request_id: str) -> Response:
    """A prefilled KV state, once: fetching removes it."""
    state = await _serving(request).backend.kv_state(request_id)
    if state is None:
        return error_response(404, f"no KV state {request_id!r} is kept", "not_found_error")
    return Response(state, media_type="application/octet-stream")


async def ipfs_announcement(request: Request, block_hash: str) -> Response:
    """The signed announcement of a chunk in this peer's IPFS that holds the block (as KV
    events name it), for another worker's `kv_from`."""
    found = None
    if block_hash.isdigit() and int(block_hash) < 1 << 64:
        found = await _serving(request).backend.announcement(int(block_hash))
    if found is None:
        return error_response(404, f"no KV in IPFS holds block {block_hash}", "not_found_error")
    return JSONResponse(found)


def _messages(messages: list[Message]) -> list[dict[str, str]]:
    """A chat's messages as chat templates read them."""
    return [{"role": m.role, "content": m.content} for m in map(Message.chat_message, messages)]


def _chat_text(backend: Backend, messages: list[dict[str, str]]) -> str:
    try:
        return backend.chat_prompt(messages)
    except TemplateError as e:
        raise InvalidJobError(f"the model's chat template failed: {e}") from e


def _chat_prompt(backend: Backend, body: ChatCompletionRequest) -> str:
    """The chat's prompt text; with `continue_final_message`, the template's prompt for the
    messages before the last, which the answer then goes on from (as vLLM renders it)."""
    messages = _messages(body.messages)
    if body.continue_final_message:
        return _chat_text(backend, messages[:-1]) + messages[-1]["content"]
    if not body.add_generation_prompt:
        raise InvalidJobError("add_generation_prompt may be false only with continue_final_message")
    return _chat_text(backend, messages)


def _job(body: GenerationRequest, prompt: str, request_id: str) -> GenerationJob:
    limit = body.limit if isinstance(body, ChatCompletionRequest) else body.max_tokens
    return GenerationJob(
        request_id=request_id,
        prompt=prompt,
        sampling=Sampling.of(body.sampling(limit)),
        kv_from=body.kv_from,
        split=body.split,
        kv_transfer_params=body.kv_transfer_params,
    )


async def _generate(serving: Serving, body: GenerationRequest, prompt: str) -> Response:
    """Starts the generation, and answers it whole or streamed once its first piece is there;
    errors before then are HTTP errors, after it error events."""
    request_id = body.request_id or uuid.uuid4().hex
    if body.model_extra:  # as vLLM's server: named, then ignored
        logger.warning("request %s: ignoring %s", request_id, ", ".join(sorted(body.model_extra)))
    usage = Usage()
    started = time.monotonic()

    def finish(reason: str) -> None:
        serving.running.pop(request_id, None)
        _account(serving.metrics, usage, reason, time.monotonic() - started)

    run = Run(usage, threading.Event(), finish)
    serving.running[request_id] = run.cancelled  # cancellable while it waits for the model, too
    try:
        generation = await serving.backend.generate(_job(body, prompt, request_id), run)
    except BaseException:
        serving.running.pop(request_id, None)
        raise
    started = time.monotonic()  # decoding is timed from here: the wait for a turn is over
    try:
        first = await generation.next()
    except BaseException:  # refused, or the client left before the first token
        generation.close()
        raise
    answering = Answering(
        chat=isinstance(body, ChatCompletionRequest),
        request_id=request_id,
        model=serving.model,
        include_usage=body.include_usage,
    )
    pieces = _pieces(generation, first)
    if body.stream:
        counts = (lambda: _usage(usage)) if body.continuous_usage else (lambda: None)

        async def close() -> None:  # async: starlette runs sync tasks in threads
            generation.close()

        # A client gone while its stream waits to send leaves `events` suspended, never
        # closed: the background task still closes the generation.
        return StreamingResponse(
            _events(pieces, answering, usage, counts),
            media_type="text/event-stream",
            background=BackgroundTask(close),
        )
    text, reason = [], "cancelled"
    async with aclosing(pieces):
        async for piece in pieces:
            text.append(piece.text)
            reason = piece.finish_reason or reason
    answer = answering.whole("".join(text), _WIRE_FINISH[reason], _usage(usage), usage.kv_transfer)
    return JSONResponse(answer.model_dump(mode="json", exclude_unset=True))


async def _pieces(generation: Generation, first: Piece | None) -> AsyncGenerator[Piece, None]:
    piece = first
    try:
        while piece is not None:
            yield piece
            piece = await generation.next()
    finally:
        generation.close()  # a client gone mid-stream stops the generation


async def _events(
    pieces: AsyncGenerator[Piece, None],
    answering: Answering,
    usage: Usage,
    counts: Callable[[], protocol.Usage | None],
) -> AsyncIterator[str]:
    async with aclosing(pieces):
        try:
            async for piece in pieces:
                if piece.text:
                    yield sse(answering.chunk(piece.text, counts()))
                if piece.finish_reason:
                    wire = _WIRE_FINISH[piece.finish_reason]
                    for chunk in answering.last(wire, _usage(usage), usage.kv_transfer):
                        yield sse(chunk)
        except WorkerFailedError as e:  # no finish reason: the caller goes on elsewhere
            detail = ErrorDetail(message=str(e), type="server_error")
            if isinstance(e, StagesLostError):
                detail.lost_stages = e.endpoints
            yield sse(ErrorResponse(error=detail))
            return
    yield DONE


def _usage(usage: Usage) -> protocol.Usage:
    return protocol.Usage.of(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)


def _account(metrics: WorkerMetrics, usage: Usage, reason: str, seconds: float) -> None:
    """A finished generation in the metrics and the peer's learned speeds."""
    metrics.generated_tokens.inc(usage.completion_tokens)
    metrics.requests.labels(reason).inc()
    if usage.first_token_seconds:
        metrics.ttft.observe(usage.first_token_seconds)
        computed = usage.prompt_tokens - usage.cached_tokens
        metrics.learn_prefill_rate(computed, usage.first_token_seconds)
    metrics.learn_decode_rate(usage.completion_tokens, seconds - (usage.first_token_seconds or 0))


Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]


def _answer_with(status: int, kind: str = "invalid_request_error") -> Handler:
    async def handle(request: Request, error: Exception) -> Response:
        return error_response(status, str(error), kind)

    return handle


async def _invalid_body(request: Request, error: RequestValidationError) -> Response:
    return invalid_request(error.errors(), skip=1)  # the first part is "body"


async def _refused(request: Request, error: WorkerRefusedError) -> Response:
    return error_response(error.status, str(error))  # by the server this worker runs (vLLM)


async def _stages_lost(request: Request, error: StagesLostError) -> Response:
    return error_response(503, str(error), "server_error", lost_stages=error.endpoints)


exception_handlers: dict[int | type[Exception], Handler] = {
    RequestValidationError: _invalid_body,
    PromptTooLongError: _answer_with(400),
    InvalidJobError: _answer_with(400),
    UnsupportedError: _answer_with(501),
    NoRoomError: _answer_with(507, "server_error"),
    WorkerRefusedError: _refused,
    StagesLostError: _stages_lost,
    WorkerFailedError: _answer_with(502, "server_error"),
}


def create_app(backend: Backend, model: str, *, metrics: WorkerMetrics | None = None) -> FastAPI:
    """The worker's app for `backend` serving `model`; the backend runs while the app does."""
    serving = Serving(backend, model, metrics or WorkerMetrics())
    serving.metrics.count_requests(serving.busy)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    app = FastAPI(title="EdgeLLM worker", lifespan=lifespan, exception_handlers=exception_handlers)
    app.state.worker = serving
    app.add_api_route("/healthz", health, methods=["GET"])
    app.add_api_route("/health", alive, methods=["GET"], response_model=None)
    app.add_api_route("/metrics", export_metrics, methods=["GET"], response_model=None)
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"], response_model=None)
    app.add_api_route(
        "/v1/chat/completions", chat_completions, methods=["POST"], response_model=None
    )
    app.add_api_route("/v1/requests/{request_id}", cancel, methods=["DELETE"], response_model=None)
    app.add_api_route("/v1/prefill", prefill, methods=["POST"], response_model=None)
    app.add_api_route(
        "/v1/kv/ipfs/{block_hash}", ipfs_announcement, methods=["GET"], response_model=None
    )
    app.add_api_route("/v1/kv/{request_id}", kv_state, methods=["GET"], response_model=None)
    return app
