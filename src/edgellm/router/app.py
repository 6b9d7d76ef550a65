"""The router's HTTP API: OpenAI's chat and plain completions (whole or streamed as server-sent
events), the models the federation serves, health and metrics.

`create_app(settings, api)` builds the app with its state on it (no globals). Every request is
checked in the order that is cheapest to refuse: key and rate (401, 429), body size (413),
schema (400), model (404), then routed by the `Dispatcher`. Errors are always OpenAI's body.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import urllib3
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from kubernetes import client
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError

from edgellm.kube import APIError, NotFoundError, translated
from edgellm.kvcache.index import KVIndex
from edgellm.kvcache.subscriptions import KVSubscriptions
from edgellm.router.access import Access, Denied
from edgellm.router.dispatch import (
    Dispatcher,
    Finished,
    Job,
    NoWorkerError,
    Piece,
    UnknownModelError,
    WorkerRefusedError,
)
from edgellm.router.metrics import RouterMetrics
from edgellm.router.peers import PeerDirectory
from edgellm.router.policies import Policy
from edgellm.router.schemas import ChatCompletionRequest, CompletionRequest, error_response
from edgellm.router.tokenizers import GgufTokenizer
from edgellm.scheduling import ProfileConfig, configured_profile

logger = logging.getLogger(__name__)


class RouterSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    cluster: str | None = None
    """This router's cluster: its own peers win when scores are close."""
    namespace: str = "default"
    api_keys_secret: str = "edgellm-router-api-keys"
    anonymous: bool = False
    rate_limit: str = "600/minute"
    max_body_bytes: int = 1 << 20
    policy: Policy = "kv-aware"
    profile: ProfileConfig | None = None
    hash_seed: str = "0"
    block_size: int = 16
    tokenizers: dict[str, Path] = {}
    max_attempts: int = 3
    peer_refresh_seconds: float = 2.0
    failure_cooldown_seconds: float = 10.0
    keys_refresh_seconds: float = 10.0


class _BodyTooLargeError(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` (a client may send no Content-Length)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _BodyTooLargeError
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _BodyTooLargeError
    return bytes(body)


def _validation_error(error: ValidationError) -> JSONResponse:
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    return error_response(400, f"{param}: {message}" if param else message, param=param)


def create_app(
    settings: RouterSettings,
    api: client.ApiClient | None = None,
    static_peers: list[dict[str, Any]] | None = None,
) -> FastAPI:
    """With `api`, peers and keys come from that cluster; without, the peers are
    `static_peers` (PeerNode bodies) and `settings.anonymous` must let callers in."""
    peers = PeerDirectory(api, KVSubscriptions(KVIndex()), settings.failure_cooldown_seconds)
    metrics = RouterMetrics()
    access = Access(settings.rate_limit, settings.anonymous)
    started = int(time.time())
    # Generations may stream for minutes; a connection waits for a pool slot 10 s at most.
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(600.0, connect=3.0, pool=10.0),
        limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
    )
    dispatcher = Dispatcher(
        peers,
        peers.kv.index,
        http,
        metrics,
        policy=settings.policy,
        profile=configured_profile(settings.profile) if settings.profile else None,
        cluster=settings.cluster,
        hash_seed=settings.hash_seed,
        block_size=settings.block_size,
        tokenizers={name: GgufTokenizer(path) for name, path in settings.tokenizers.items()},
        max_attempts=settings.max_attempts,
    )

    async def follow_keys() -> None:
        core = client.CoreV1Api(api)
        while True:
            try:
                with translated():
                    secret = await asyncio.to_thread(
                        core.read_namespaced_secret, settings.api_keys_secret, settings.namespace
                    )
                access.set_secret(secret.data)
            except NotFoundError:
                access.set_secret(None)  # no Secret: no key is valid
            except APIError as e:
                logger.warning("cannot read the API keys, keeping those known: %s", e.reason)
            except (urllib3.exceptions.HTTPError, OSError) as e:  # the cluster is away
                logger.warning("cannot read the API keys, keeping those known: %s", e)
            await asyncio.sleep(settings.keys_refresh_seconds)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = []
        if api is None:
            peers.set_peers(static_peers or [])  # here: following KV events needs the loop
        else:
            await peers.refresh()
            tasks = [
                asyncio.create_task(peers.follow(settings.peer_refresh_seconds)),
                asyncio.create_task(follow_keys()),
            ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await peers.kv.stop()
            await http.aclose()

    app = FastAPI(title="EdgeLLM router", lifespan=lifespan)
    app.state.peers = peers
    app.state.dispatcher = dispatcher
    app.state.metrics = metrics

    def denied(refusal: Denied) -> JSONResponse:
        kind = "rate_limit_error" if refusal.status == 429 else "authentication_error"
        headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after else None
        return error_response(refusal.status, refusal.message, kind, None, refusal.code, headers)

    @app.get("/healthz")
    def health() -> dict[str, Any]:
        return {
            "peers": len(peers.peers),
            "draining": sorted(n for n, p in peers.peers.items() if p.spec.unschedulable),
            "failing": sorted(peers.failing()),
            "models": peers.models(),
            "policy": settings.policy,
        }

    @app.get("/metrics")
    def export() -> Response:
        for medium, count in peers.kv.index.blocks_by_medium().items():
            metrics.index_blocks.labels(medium).set(count)
        metrics.peers.clear()
        for peer in peers.peers.values():
            metrics.peers.labels(peer.spec.cluster).inc()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=None)
    def models(request: Request) -> Response:
        caller = access.check(request.headers.get("authorization"))
        if isinstance(caller, Denied):
            return denied(caller)
        listed = [
            {"id": name, "object": "model", "created": started, "owned_by": "edgellm"}
            for name in peers.models()
        ]
        return JSONResponse({"object": "list", "data": listed})

    async def complete(
        request: Request,
        endpoint: str,
        parse: Callable[[Any], ChatCompletionRequest | CompletionRequest],
    ) -> Response:
        caller = access.check(request.headers.get("authorization"))
        if isinstance(caller, Denied):
            metrics.requests.labels(endpoint, "", str(caller.status)).inc()
            return denied(caller)
        try:
            raw = json.loads(await _read_body(request, settings.max_body_bytes))
            asked = parse(raw)
            job = Job(uuid.uuid4().hex, asked.spec())
        except _BodyTooLargeError:
            metrics.requests.labels(endpoint, "", "413").inc()
            return error_response(
                413, f"the body is larger than {settings.max_body_bytes} bytes", code="too_large"
            )
        except ValidationError as e:
            metrics.requests.labels(endpoint, "", "400").inc()
            return _validation_error(e)
        except (ValueError, UnicodeDecodeError):
            metrics.requests.labels(endpoint, "", "400").inc()
            return error_response(400, "the body is not valid JSON")
        model = job.spec.model
        answer = _Answer(endpoint, job, asked.include_usage)
        pieces = dispatcher.run(job)
        try:
            first = await anext(pieces)
        except (UnknownModelError, NoWorkerError, WorkerRefusedError) as e:
            refusal = _refusal(e)
            metrics.requests.labels(endpoint, model, str(refusal.status_code)).inc()
            return refusal
        peer = {"x-edgellm-peer": first.peer}
        if first.prefill_peer:
            peer["x-edgellm-prefill-peer"] = first.prefill_peer
        if not asked.stream:
            text, finished = [], None
            async with contextlib.aclosing(pieces):
                item: Piece | Finished = first
                while True:
                    if isinstance(item, Finished):
                        finished = item
                        break
                    text.append(item.text)
                    try:
                        item = await anext(pieces)
                    except (NoWorkerError, WorkerRefusedError) as e:
                        refusal = _refusal(e)
                        metrics.requests.labels(endpoint, model, str(refusal.status_code)).inc()
                        return refusal
            _observe(metrics, model, finished)
            metrics.requests.labels(endpoint, model, "200").inc()
            return JSONResponse(answer.whole("".join(text), finished), headers=peer)

        async def events() -> AsyncIterator[str]:
            item: Piece | Finished | None = first
            try:
                while item is not None:
                    if isinstance(item, Finished):
                        _observe(metrics, model, item)
                        for chunk in answer.last(item):
                            yield f"data: {json.dumps(chunk)}\n\n"
                        break
                    yield f"data: {json.dumps(answer.chunk(item.text))}\n\n"
                    item = await anext(pieces, None)
                metrics.requests.labels(endpoint, model, "200").inc()
            except (NoWorkerError, WorkerRefusedError) as e:
                # Headers are sent: the error goes in the stream, where OpenAI's clients look.
                metrics.requests.labels(endpoint, model, str(_refusal(e).status_code)).inc()
                error = {"error": {"message": str(e), "type": "server_error"}}
                yield f"data: {json.dumps(error)}\n\n"
            finally:
                await pieces.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=peer)

    @app.post("/v1/kv/lookup", response_model=None)
    async def kv_lookup(request: Request) -> Response:
        """A completion or chat body's prompt, looked up in the KV index without running it."""
        caller = access.check(request.headers.get("authorization"))
        if isinstance(caller, Denied):
            return denied(caller)
        try:
            raw = json.loads(await _read_body(request, settings.max_body_bytes))
            kind = ChatCompletionRequest if "messages" in raw else CompletionRequest
            job = Job(uuid.uuid4().hex, kind.model_validate(raw).spec())
        except _BodyTooLargeError:
            return error_response(413, f"the body is larger than {settings.max_body_bytes} bytes")
        except ValidationError as e:
            return _validation_error(e)
        except (ValueError, TypeError, UnicodeDecodeError):
            return error_response(400, "the body is not a JSON object")
        return JSONResponse(await dispatcher.explain(job))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        return await complete(request, "chat", ChatCompletionRequest.model_validate)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await complete(request, "completions", CompletionRequest.model_validate)

    return app


def _refusal(error: Exception) -> JSONResponse:
    if isinstance(error, UnknownModelError):
        return error_response(404, str(error), code="model_not_found", param="model")
    if isinstance(error, WorkerRefusedError):
        return error_response(error.status, str(error))
    return error_response(503, str(error), "server_error", headers={"Retry-After": "1"})


def _observe(metrics: RouterMetrics, model: str, finished: Finished) -> None:
    metrics.prompt_tokens.labels(model).inc(finished.prompt_tokens)
    metrics.cached_tokens.labels(model).inc(finished.cached_tokens)
    metrics.generation_tokens.labels(model).inc(finished.completion_tokens)
    metrics.duration.labels(model).observe(finished.total_seconds)
    if finished.first_token_seconds is not None:
        metrics.ttft.labels(model).observe(finished.first_token_seconds)
        if finished.completion_tokens > 1:
            decode = finished.total_seconds - finished.first_token_seconds
            metrics.inter_token.labels(model).observe(decode / (finished.completion_tokens - 1))


class _Answer:
    """One request's answer in OpenAI's shapes: whole, or as stream chunks."""

    def __init__(self, endpoint: str, job: Job, include_usage: bool) -> None:
        self.chat = endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + job.id
        self.model = job.spec.model
        self.created = int(time.time())
        self.include_usage = include_usage
        self._role_sent = False

    def _envelope(self, stream: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if stream and self.chat else kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    @staticmethod
    def _usage(finished: Finished) -> dict[str, Any]:
        return {
            "prompt_tokens": finished.prompt_tokens,
            "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finished.cached_tokens},
        }

    def _choice(self, text: str, finish_reason: str | None, whole: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if whole:
            message = {"role": "assistant", "content": text}
            return {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        delta: dict[str, Any] = {"content": text} if text or finish_reason is None else {}
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def whole(self, text: str, finished: Finished) -> dict[str, Any]:
        body = self._envelope(False, [self._choice(text, _finish(finished), whole=True)])
        return {**body, "usage": self._usage(finished)}

    def chunk(self, text: str) -> dict[str, Any]:
        return self._envelope(True, [self._choice(text, None, whole=False)])

    def last(self, finished: Finished) -> list[dict[str, Any]]:
        chunks = [self._envelope(True, [self._choice("", _finish(finished), whole=False)])]
        if self.include_usage:
            chunks.append({**self._envelope(True, []), "usage": self._usage(finished)})
        return chunks


def _finish(finished: Finished) -> str:
    # The worker's "cancelled" cannot reach a client still listening; "stop" is OpenAI's word.
    return "length" if finished.finish_reason == "length" else "stop"
