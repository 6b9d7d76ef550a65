"""`WorkerClient`: the one place that calls a worker over HTTP.

The router and the operator stream generations with it, split leaders stream from the child
that runs their model, the vLLM backend streams from `vllm serve`, and schedulers tokenize
prompts with it. It speaks the OpenAI API of `protocol` to EdgeLLM's workers and to stock
OpenAI-compatible servers alike, and turns every failure into an `errors.WorkerError`.

I/O goes through one `httpx.AsyncBaseTransport`, as in httpx itself: unit tests pass an
`httpx.MockTransport`, everything else the default network transport. Parsing a stream is
`StreamReader`, pure, fed one line at a time.
"""

import json
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import httpx
from pydantic import ValidationError

from edgellm.workerapi.errors import (
    ClientBusyError,
    StagesLostError,
    WorkerError,
    WorkerFailedError,
    WorkerRefusedError,
)
from edgellm.workerapi.protocol import (
    ChatCompletionRequest,
    Chunk,
    ErrorResponse,
    GenerationRequest,
    KVTransfer,
    ModelList,
    PrefillResponse,
    StreamOptions,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]
"""Why a generation ended, as EdgeLLM records it."""

# A worker's finish reasons (vLLM's words) as EdgeLLM's. A reason a later server adds ends the
# generation normally rather than failing a finished request.
_FINISH_REASONS: Final[dict[str, FinishReason]] = {
    "stop": "stop",
    "length": "length",
    "abort": "cancelled",
    "cancelled": "cancelled",
}

DEFAULT_TIMEOUT: Final = httpx.Timeout(600.0, connect=5.0, pool=10.0)
"""Generations may stream for minutes; a connection waits for a free slot 10 s at most."""
DEFAULT_LIMITS: Final = httpx.Limits(max_connections=512, max_keepalive_connections=128)
TOKENIZE_TIMEOUT: Final = 2.0
"""Seconds a tokenization may take: it only informs a preference."""
CANCEL_TIMEOUT: Final = 5.0
MODELS_TIMEOUT: Final = 2.0
"""Seconds a worker may take to list its models: the status page's probe, nothing waits on it."""


@dataclass(frozen=True)
class Text:
    """Generated text, and how many tokens the attempt has generated with it."""

    text: str
    completion_tokens: int
    prompt_tokens: int | None = None


@dataclass(frozen=True)
class Finished:
    """How a generation ended, with the worker's counts."""

    finish_reason: FinishReason
    usage: Usage
    kv_transfer: KVTransfer | None = None
    first_token_seconds: float | None = None


class StreamReader:
    """A worker's streamed answer, one server-sent event line at a time.

    Pure, so tests feed it chunks shaped exactly as vLLM writes them. Text comes out as it
    arrives; the end waits for `[DONE]`, after the usage chunk, because whoever reads the
    finish reason reads the final counts with it. Without vLLM's continuous usage, each chunk
    with text counts as one token.
    """

    def __init__(self) -> None:
        self.usage = Usage()
        self.done = False
        self._finish: FinishReason | None = None
        self._kv_transfer: KVTransfer | None = None
        self._chunks = 0

    def feed(self, line: str) -> list[Text | Finished]:
        """What one line of the event stream completes."""
        if not line.startswith("data:"):
            return []  # blank separators, comments, other SSE fields
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            self.done = True
            if self._finish is None:
                raise WorkerFailedError("the stream ended without a finish reason")
            return [Finished(self._finish, self.usage, self._kv_transfer)]
        try:
            payload = json.loads(data)
        except ValueError as e:
            raise WorkerFailedError(f"an event that is not JSON: {data[:200]!r}") from e
        if isinstance(payload, dict) and "error" in payload:
            raise _read_error(500, payload)
        try:
            chunk = Chunk.model_validate(payload)
        except ValidationError as e:
            raise WorkerFailedError(f"an event that is not a chunk: {data[:200]!r}") from e
        if chunk.usage is not None:
            self.usage = chunk.usage
        self._kv_transfer = chunk.kv_transfer or self._kv_transfer
        events: list[Text | Finished] = []
        for choice in chunk.choices:
            if choice.content:
                self._chunks += 1
                counted = chunk.usage.completion_tokens if chunk.usage else self._chunks
                prompt = chunk.usage.prompt_tokens if chunk.usage else None
                events.append(Text(choice.content, counted, prompt))
            if choice.finish_reason is not None:
                self._finish = _FINISH_REASONS.get(choice.finish_reason, "stop")
        return events


def _read_error(status: int, body: bytes | dict[str, object]) -> WorkerError:
    """The error for a worker's refusal (a 4xx) or failure (a 5xx, or an error event) with
    `status` and this error body."""
    try:
        if isinstance(body, dict):
            message, lost = _detail(ErrorResponse.model_validate(body))
        else:
            message, lost = _detail(ErrorResponse.model_validate_json(body))
    except ValidationError:
        text = body.decode(errors="replace") if isinstance(body, bytes) else json.dumps(body)
        message, lost = text[:500], None
    if status < 500:
        return WorkerRefusedError(status, message)
    if lost:
        return StagesLostError(lost, message)
    return WorkerFailedError(f"answered {status}: {message}")


def _detail(error: ErrorResponse) -> tuple[str, list[str] | None]:
    return error.error.message, error.error.lost_stages


def _url(endpoint: str, path: str) -> str:
    return f"{endpoint.rstrip('/')}{path}"


class WorkerClient:
    """Calls workers over one pool of connections; closed with `aclose`."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
    ) -> None:
        self._http = httpx.AsyncClient(transport=transport, timeout=timeout, limits=limits)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def stream(
        self,
        endpoint: str,
        request: GenerationRequest,
        *,
        http_timeout: httpx.Timeout | None = None,
    ) -> AsyncGenerator[Text | Finished, None]:
        """The generation as the worker at `endpoint` streams it, with its token counts.

        Always streamed, whatever `request.stream` says: a worker lost mid-generation leaves
        the text so far. Closing the iterator closes the stream, which stops the generation.
        """
        path = (
            "/v1/chat/completions"
            if isinstance(request, ChatCompletionRequest)
            else "/v1/completions"
        )
        options = StreamOptions(include_usage=True, continuous_usage_stats=True)
        body = request.model_copy(update={"stream": True, "stream_options": options})
        wire = body.model_dump(mode="json", exclude_defaults=True)
        reader, started, first = StreamReader(), time.monotonic(), None
        waits = httpx.USE_CLIENT_DEFAULT if http_timeout is None else http_timeout
        try:
            async with self._http.stream(
                "POST", _url(endpoint, path), json=wire, timeout=waits
            ) as answer:
                if answer.status_code >= 400:
                    raise _read_error(answer.status_code, await answer.aread())
                # Read to the end, [DONE] included: a stream left unread loses its connection.
                async for line in answer.aiter_lines():
                    for event in reader.feed(line):
                        if isinstance(event, Finished):
                            event = Finished(
                                event.finish_reason, event.usage, event.kv_transfer, first
                            )
                        elif first is None:
                            first = time.monotonic() - started
                        yield event
        except httpx.PoolTimeout as e:
            raise ClientBusyError("no connection to a worker is free") from e
        except httpx.HTTPError as e:
            raise WorkerFailedError(f"{endpoint}: {str(e) or type(e).__name__}") from e
        if not reader.done:
            raise WorkerFailedError(f"{endpoint}: the stream ended without finishing")

    async def tokenize(self, endpoint: str, request: TokenizeRequest) -> list[int]:
        """The prompt's tokens, as the worker computes it (vLLM's `/tokenize`)."""
        wire = request.model_dump(mode="json", exclude_none=True)
        answer = await self._call("POST", _url(endpoint, "/tokenize"), wire, TOKENIZE_TIMEOUT)
        return TokenizeResponse.model_validate_json(answer.content).tokens

    async def tokenize_first(
        self, endpoints: Sequence[str], request: TokenizeRequest, *, tries: int = 2
    ) -> list[int] | None:
        """The tokens from the first of `endpoints` that answers, trying `tries` of them (this
        only informs a preference); None when none does."""
        for endpoint in endpoints[:tries]:
            try:
                return await self.tokenize(endpoint, request)
            except (WorkerError, ValidationError) as e:
                logger.info("tokenizing on %s for the KV index: %s", endpoint, e)
        return None

    async def models(self, endpoint: str) -> list[str]:
        """The models the worker serves now (OpenAI's `GET /v1/models`, which stock servers
        answer too)."""
        answer = await self._call("GET", _url(endpoint, "/v1/models"), None, MODELS_TIMEOUT)
        try:
            return [card.id for card in ModelList.model_validate_json(answer.content).data]
        except ValidationError as e:
            raise WorkerFailedError(f"{endpoint}: /v1/models is not a model list") from e

    async def prefill(self, endpoint: str, request: GenerationRequest) -> PrefillResponse:
        """Computes the prompt's KV on the worker, which keeps it for `GET /v1/kv/{id}`."""
        wire = request.model_dump(mode="json", exclude_defaults=True)
        answer = await self._call("POST", _url(endpoint, "/v1/prefill"), wire, None)
        return PrefillResponse.model_validate_json(answer.content)

    async def cancel(self, endpoint: str, request_id: str) -> bool:
        """Stops a generation at its next token; False when it is not running there."""
        try:
            url = _url(endpoint, f"/v1/requests/{request_id}")
            await self._call("DELETE", url, None, CANCEL_TIMEOUT)
        except WorkerRefusedError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def _call(
        self, method: str, url: str, body: object, http_timeout: float | None
    ) -> httpx.Response:
        waits = httpx.USE_CLIENT_DEFAULT if http_timeout is None else http_timeout
        try:
            answer = await self._http.request(method, url, json=body, timeout=waits)
        except httpx.PoolTimeout as e:
            raise ClientBusyError("no connection to a worker is free") from e
        except httpx.HTTPError as e:
            raise WorkerFailedError(f"{url}: {str(e) or type(e).__name__}") from e
        if answer.status_code >= 400:
            raise _read_error(answer.status_code, answer.content)
        return answer
