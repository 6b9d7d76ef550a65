"""The router's HTTP API: OpenAI's chat and plain completions (whole or streamed as server-sent
events), the models the federation serves, health and metrics; the status page's routes are
`statuspage.py`'s, added here.

`create_app(settings, api)` builds the app with its state on it (`app.state.router`, no
globals); the routes are functions of this module that read it. Every request is checked in the
order that is cheapest to refuse: key and rate (401, 429), body size (413), schema (400), model
(404), then routed by the `Dispatcher`. Answers and errors are the worker protocol's OpenAI
shapes (`edgellm.workerapi.protocol`), which the workers answer the router in too.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from edgellm.router.dispatch import Dispatcher, NoWorkerError, UnknownModelError
from edgellm.router.metrics import RouterMetrics
from edgellm.router.peers import PeerDirectory
from edgellm.router.policies import Policy
from edgellm.router.probes import Prober
from edgellm.router.requestlog import RequestLog
from edgellm.router.schemas import ChatCompletionRequest, CompletionRequest
from edgellm.router.status import Members, Sources
from edgellm.router.statuspage import StatusAccess, StatusPage, add_routes
from edgellm.router.tokenizers import GgufTokenizer
from edgellm.scheduling import ProfileConfig, configured_profile
from edgellm.workerapi import Job, Outcome, Piece, WorkerClient, WorkerRefusedError
from edgellm.workerapi.protocol import (
    DONE,
    Answering,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    error_response,
    invalid_request,
    sse,
)

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
    status_page: StatusAccess = "loopback"
    """Who sees the status page without a key: callers on loopback, or nobody."""
    probe_interval_seconds: float = 10.0
    """How often the status page's prober asks each worker for its models, while watched."""


@dataclass
class Routing:
    """What the routes share."""

    settings: RouterSettings
    peers: PeerDirectory
    dispatcher: Dispatcher
    metrics: RouterMetrics
    access: Access
    requests: RequestLog
    started: int = field(default_factory=lambda: int(time.time()))


class _BodyTooLargeError(Exception):
    pass


def _routing(request: Request) -> Routing:
    routing: Routing = request.app.state.router
    return routing


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


def _refusal(error: Exception) -> JSONResponse:
    if isinstance(error, UnknownModelError):
        return error_response(404, str(error), code="model_not_found", param="model")
    if isinstance(error, WorkerRefusedError):
        return error_response(error.status, str(error))
    return error_response(503, str(error), "server_error", headers={"Retry-After": "1"})


async def health(request: Request) -> dict[str, Any]:
    routing = _routing(request)
    peers = routing.peers
    return {
        "peers": len(peers.peers),
        "draining": sorted(n for n, p in peers.peers.items() if p.spec.unschedulable),
        "failing": sorted(peers.failing()),
        "models": peers.models(),
        "policy": routing.settings.policy,
    }


async def export_metrics(request: Request) -> Response:
    routing = _routing(request)
    metrics, peers = routing.metrics, routing.peers
    for medium, count in peers.kv.index.blocks_by_medium().items():
        metrics.index_blocks.labels(medium).set(count)
    metrics.peers.clear()
    for peer in peers.peers.values():
        metrics.peers.labels(peer.spec.cluster).inc()
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def models(request: Request) -> Response:
    routing = _routing(request)
    caller = routing.access.check(request.headers.get("authorization"))
    if isinstance(caller, Denied):
        return caller.response()
    cards = [ModelCard(id=name, created=routing.started) for name in routing.peers.models()]
    return JSONResponse(ModelList(data=cards).model_dump(exclude_none=True))


async def chat_completions(request: Request) -> Response:
    return await _complete(request, "chat")


async def completions(request: Request) -> Response:
    return await _complete(request, "completions")


async def kv_lookup(request: Request) -> Response:
    """A completion or chat body's prompt, looked up in the KV index without running it."""
    routing = _routing(request)
    caller = routing.access.check(request.headers.get("authorization"))
    if isinstance(caller, Denied):
        return caller.response()
    limit = routing.settings.max_body_bytes
    try:
        raw = json.loads(await _read_body(request, limit))
        kind = ChatCompletionRequest if "messages" in raw else CompletionRequest
        job = Job(uuid.uuid4().hex, kind.model_validate(raw).spec())
    except _BodyTooLargeError:
        return error_response(413, f"the body is larger than {limit} bytes")
    except ValidationError as e:
        return invalid_request(e.errors())
    except (ValueError, TypeError, UnicodeDecodeError):
        return error_response(400, "the body is not a JSON object")
    return JSONResponse(await routing.dispatcher.explain(job))


async def _complete(request: Request, endpoint: str) -> Response:
    routing = _routing(request)
    metrics, limit = routing.metrics, routing.settings.max_body_bytes
    caller = routing.access.check(request.headers.get("authorization"))
    if isinstance(caller, Denied):
        metrics.requests.labels(endpoint, "", str(caller.status)).inc()
        return caller.response()
    kind = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
    try:
        asked = kind.model_validate(json.loads(await _read_body(request, limit)))
        job = Job(uuid.uuid4().hex, asked.spec())
    except _BodyTooLargeError:
        metrics.requests.labels(endpoint, "", "413").inc()
        return error_response(413, f"the body is larger than {limit} bytes", code="too_large")
    except ValidationError as e:
        metrics.requests.labels(endpoint, "", "400").inc()
        return invalid_request(e.errors())
    except (ValueError, UnicodeDecodeError):
        metrics.requests.labels(endpoint, "", "400").inc()
        return error_response(400, "the body is not valid JSON")
    model = job.spec.model
    answering = Answering(
        chat=endpoint == "chat", request_id=job.id, model=model, include_usage=asked.include_usage
    )
    pieces = routing.requests.track(job, routing.dispatcher.run(job))
    try:
        first = await anext(pieces)
    except (UnknownModelError, NoWorkerError, WorkerRefusedError) as e:
        refusal = _refusal(e)
        metrics.requests.labels(endpoint, model, str(refusal.status_code)).inc()
        return refusal
    placement = first.placement
    headers = {"x-edgellm-peer": placement.peer}
    if placement.prefill_peer:
        headers["x-edgellm-prefill-peer"] = placement.prefill_peer
    if asked.stream:
        return StreamingResponse(
            _events(metrics, endpoint, model, answering, pieces, first),
            media_type="text/event-stream",
            headers=headers,
        )
    text, outcome = [], None
    async with contextlib.aclosing(pieces):
        item: Piece | Outcome = first
        while not isinstance(item, Outcome):
            text.append(item.text)
            try:
                item = await anext(pieces)
            except (NoWorkerError, WorkerRefusedError) as e:
                refusal = _refusal(e)
                metrics.requests.labels(endpoint, model, str(refusal.status_code)).inc()
                return refusal
        outcome = item
    _observe(metrics, model, outcome)
    metrics.requests.labels(endpoint, model, "200").inc()
    answer = answering.whole("".join(text), _finish(outcome), _usage(outcome))
    return JSONResponse(answer.model_dump(mode="json", exclude_unset=True), headers=headers)


async def _events(
    metrics: RouterMetrics,
    endpoint: str,
    model: str,
    answering: Answering,
    pieces: AsyncGenerator[Piece | Outcome, None],
    first: Piece | Outcome,
) -> AsyncIterator[str]:
    item: Piece | Outcome | None = first
    try:
        while item is not None:
            if isinstance(item, Outcome):
                _observe(metrics, model, item)
                for chunk in answering.last(_finish(item), _usage(item)):
                    yield sse(chunk)
                break
            yield sse(answering.chunk(item.text))
            item = await anext(pieces, None)
        metrics.requests.labels(endpoint, model, "200").inc()
    except (NoWorkerError, WorkerRefusedError) as e:
        # Headers are sent: the error goes in the stream, where OpenAI's clients look.
        metrics.requests.labels(endpoint, model, str(_refusal(e).status_code)).inc()
        yield sse(ErrorResponse(error=ErrorDetail(message=str(e), type="server_error")))
    finally:
        await pieces.aclose()
    yield DONE


def _usage(outcome: Outcome) -> Usage:
    return Usage.of(outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens)


def _finish(outcome: Outcome) -> str:
    # The worker's "cancelled" cannot reach a client still listening; "stop" is OpenAI's word.
    return "length" if outcome.finish_reason == "length" else "stop"


def _observe(metrics: RouterMetrics, model: str, outcome: Outcome) -> None:
    metrics.prompt_tokens.labels(model).inc(outcome.prompt_tokens)
    metrics.cached_tokens.labels(model).inc(outcome.cached_tokens)
    metrics.generation_tokens.labels(model).inc(outcome.completion_tokens)
    metrics.duration.labels(model).observe(outcome.total_seconds)
    if outcome.first_token_seconds is not None:
        metrics.ttft.labels(model).observe(outcome.first_token_seconds)
        if outcome.completion_tokens > 1:
            decode = outcome.total_seconds - outcome.first_token_seconds
            metrics.inter_token.labels(model).observe(decode / (outcome.completion_tokens - 1))


async def _follow_keys(api: client.ApiClient, settings: RouterSettings, access: Access) -> None:
    """Re-reads the API keys' Secret every `keys_refresh_seconds`."""
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
    workers = WorkerClient()
    dispatcher = Dispatcher(
        peers=peers,
        index=peers.kv.index,
        client=workers,
        metrics=metrics,
        policy=settings.policy,
        profile=configured_profile(settings.profile) if settings.profile else None,
        cluster=settings.cluster,
        hash_seed=settings.hash_seed,
        block_size=settings.block_size,
        tokenizers={name: GgufTokenizer(path) for name, path in settings.tokenizers.items()},
        max_attempts=settings.max_attempts,
    )
    requests = RequestLog()
    prober = Prober(peers, workers, interval=settings.probe_interval_seconds)
    sources = Sources(settings.cluster, peers, peers.kv.index, requests, prober.results)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(prober.run())]
        if api is None:
            peers.set_peers(static_peers or [])  # here: following KV events needs the loop
        else:
            await peers.refresh()
            tasks += [
                asyncio.create_task(peers.follow(settings.peer_refresh_seconds)),
                asyncio.create_task(_follow_keys(api, settings, access)),
            ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await peers.kv.stop()
            await workers.aclose()

    app = FastAPI(title="EdgeLLM router", lifespan=lifespan)
    app.state.router = Routing(settings, peers, dispatcher, metrics, access, requests)
    members = Members(api, settings.peer_refresh_seconds)
    add_routes(app, StatusPage(sources, members, prober, access, settings.status_page))
    app.add_api_route("/healthz", health, methods=["GET"])
    app.add_api_route("/metrics", export_metrics, methods=["GET"], response_model=None)
    app.add_api_route("/v1/models", models, methods=["GET"], response_model=None)
    app.add_api_route("/v1/kv/lookup", kv_lookup, methods=["POST"], response_model=None)
    app.add_api_route(
        "/v1/chat/completions", chat_completions, methods=["POST"], response_model=None
    )
    app.add_api_route("/v1/completions", completions, methods=["POST"], response_model=None)
    return app
