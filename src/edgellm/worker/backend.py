"""What the worker's HTTP layer (`server.py`) asks of an inference engine, and what the engines
share.

Three backends implement `Backend`: llama.cpp (`llamaworker.LlamaCppWorker`, over the engine of
`llamacpp.py`), vLLM (`vllm.VllmBackend`, a `vllm serve` child) and a split model's leader
(`split.SplitLeader`, an `edgellm worker` child over llama.cpp RPC stages). The server calls
them through this protocol only; what one cannot do it refuses with `UnsupportedError`.

Errors the server answers for every backend::

    ValueError
    ├── PromptTooLongError  the prompt and max_tokens do not fit the context: 400
    └── InvalidJobError     the request does not suit this backend (a split plan sent to a
                            model served whole): 400
    UnsupportedError        this backend cannot do what was asked (a vLLM worker asked to
                            prefill): 501
    NoRoomError             what was asked to be kept is larger than the room for it: 507
"""

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from edgellm.api import SamplingParams
from edgellm.workerapi.client import FinishReason, Text, WorkerClient
from edgellm.workerapi.protocol import CompletionRequest, KVTransfer, PrefillResponse, SplitPlan


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False

    @classmethod
    def of(cls, params: SamplingParams) -> "Sampling":
        return cls(**{**params.model_dump(), "stop": tuple(params.stop)})


@dataclass(frozen=True)
class Piece:
    """One generated token's text; the last piece of a generation carries the finish reason."""

    text: str
    finish_reason: FinishReason | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token_seconds: float | None = None
    kv_transfer: KVTransfer | None = None
    """What `kv_from` loaded, when it did."""


class PromptTooLongError(ValueError):
    """The prompt plus max_tokens does not fit the model's context."""


class InvalidJobError(ValueError):
    """The request does not suit this backend."""


class UnsupportedError(Exception):
    """The backend cannot do what was asked (a vLLM worker asked to prefill, for instance)."""


class NoRoomError(Exception):
    """What was asked to be kept is larger than the room for it."""


class NoKVSharing:
    """For backends that share no KV with other workers' `kv_from` (vLLM, whose KV LMCache
    moves; a split model, whose peers compute its prompts): prefill refused, nothing kept."""

    no_prefill: str = "this worker does not prefill for other workers"

    async def prefill(self, job: "GenerationJob") -> PrefillResponse:
        raise UnsupportedError(self.no_prefill)

    async def kv_state(self, key: str) -> bytes | None:
        return None

    async def announcement(self, block_hash: int) -> dict[str, Any] | None:
        return None


@dataclass(frozen=True)
class GenerationJob:
    """A generation as the server asks it of a backend."""

    request_id: str
    prompt: str
    """The text to go on from: a chat rendered through the model's template, and any text
    a lost worker already generated after it."""
    sampling: Sampling
    kv_from: str | None = None
    split: SplitPlan | None = None
    kv_transfer_params: dict[str, Any] | None = None


@dataclass(frozen=True)
class Run:
    """What the server hands a backend with each generation besides the job: the counts to
    fill in as it goes, the event that stops it at its next token, and who hears how it ended
    (the finish reason, once it is closed)."""

    usage: Usage
    cancelled: threading.Event
    on_close: Callable[[str], None]


class Generation:
    """One generation while it runs: its pieces, and `close`, which stops it however the request
    ended (finished, cancelled, or its client gone mid-token).

    A backend with a single context (llama.cpp) yields its pieces from a plain iterator, each
    step run in a thread; `release` gives the context back once that thread has left it, and
    may return a future that holds it longer (its state being read). A backend that batches
    requests itself yields from an async generator, which closing aborts. `close` never
    awaits, because a task cancelled by a client's disconnect is cancelled again at each await
    of its cleanup; `on_close` then gets the finish reason.
    """

    def __init__(
        self,
        pieces: Iterator[Piece] | AsyncGenerator[Piece, None],
        run: Run,
        *,
        release: Callable[[], "asyncio.Future[Any] | None"] = lambda: None,
    ) -> None:
        self._pieces = pieces
        self._cancelled = run.cancelled
        self._on_close = run.on_close
        self._release = release
        self._step: asyncio.Future[Piece | None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._reason = "cancelled"  # until a piece says otherwise
        self._closed = False

    async def next(self) -> Piece | None:
        """The next piece, None after the last; the first one checks the prompt's length."""
        if self._closed:
            return None
        if isinstance(self._pieces, Iterator):
            self._step = asyncio.ensure_future(asyncio.to_thread(next, self._pieces, None))
            piece = await asyncio.shield(self._step)  # a cancelled caller leaves the thread be
        elif self._cancelled.is_set():
            self.close()
            return Piece("", "cancelled")
        else:
            piece = await anext(self._pieces, None)
        if piece is not None and piece.finish_reason:
            self._reason = piece.finish_reason
        return piece

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancelled.set()

        def idle(_: object = None) -> None:
            self._on_close(self._reason)
            self._release()

        if isinstance(self._pieces, Iterator):
            if self._step is None or self._step.done():
                idle()
            else:
                self._step.add_done_callback(idle)
        else:
            idle()
            # Closing the generator is what aborts its request; in a task of its own, as a
            # cleanup must not await.
            self._closing = asyncio.ensure_future(self._pieces.aclose())


def completion_request(
    model: str,
    prompt: str,
    sampling: Sampling,
    kv_transfer_params: Mapping[str, Any] | None = None,
) -> CompletionRequest:
    """What a backend asks of the OpenAI server it runs (`vllm serve`, a split's child worker)
    for `prompt`, every sampling parameter passed on (vLLM 0.33's
    `vllm/entrypoints/openai/completion/protocol.py`: CompletionRequest)."""
    return CompletionRequest(
        model=model,
        prompt=prompt,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,  # 0 turns it off, in vLLM as in the API
        stop=list(sampling.stop),
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        ignore_eos=sampling.ignore_eos,
        seed=sampling.seed,
        kv_transfer_params=dict(kv_transfer_params) if kv_transfer_params is not None else None,
    )


async def stream_pieces(
    client: WorkerClient, endpoint: str, request: CompletionRequest, usage: Usage
) -> AsyncGenerator[Piece, None]:
    """The generation an OpenAI server at `endpoint` streams, as `Piece`s; `usage` is filled
    as it goes, exact even when the caller leaves early (vLLM's continuous usage)."""
    started = time.monotonic()
    async with aclosing(client.stream(endpoint, request)) as events:
        async for event in events:
            if isinstance(event, Text):
                if usage.first_token_seconds is None:
                    usage.first_token_seconds = time.monotonic() - started
                usage.completion_tokens = event.completion_tokens
                usage.prompt_tokens = event.prompt_tokens or usage.prompt_tokens
                yield Piece(event.text)
                continue
            usage.prompt_tokens = event.usage.prompt_tokens
            usage.completion_tokens = event.usage.completion_tokens
            usage.cached_tokens = event.usage.cached_tokens
            yield Piece("", event.finish_reason)


class Backend(Protocol):
    @property
    def context(self) -> int:
        """The model's context length in tokens; 0 while unknown."""

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """A chat's prompt text, from the model's own chat template."""

    async def tokenize(self, text: str) -> list[int]:
        """The tokens the backend computes `text` as."""

    def running(self, in_flight: int) -> int:
        """How many of the `in_flight` generations compute now; the others wait their turn."""

    async def start(self) -> None:
        """Called before the first request (a child process is started)."""

    async def stop(self) -> None:
        """Called after the last request."""

    async def generate(self, job: GenerationJob, run: Run) -> Generation:
        """Starts the generation, once the backend can take it, for `run`."""

    async def prefill(self, job: GenerationJob) -> PrefillResponse:
        """Computes the prompt's KV and keeps it for `GET /v1/kv/{request_id}`."""

    async def kv_state(self, key: str) -> bytes | None:
        """A state that `prefill` kept, handed out once."""

    async def announcement(self, block_hash: int) -> dict[str, Any] | None:
        """The signed announcement of a chunk of KV in IPFS that holds the block."""
