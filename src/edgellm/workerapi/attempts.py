"""The attempt loop: place the request on a worker, stream its generation, and when the worker
fails, leave it out and go on elsewhere from the tokens generated so far.

The router (`edgellm.router.dispatch`) and the operator (`edgellm.operator.requests`) run every
request through `attempts`; what differs between them is behind `Hooks`: how a worker is
chosen (and, for the router, whether another peer prefills the prompt), and what an attempt's
start and failure write (routing metrics; the request's status and Events). Each consumes what
`attempts` yields into its own sink: server-sent events to the router's client, status writes
for the operator.

The decisions are pure functions of their inputs, tested without a worker: `worker_request`
(what the next worker is asked: the rest of the token budget, and the text so far to go on
from), `lost_peers` (whom a failure excludes) and `estimated_tokens`.
"""

import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from edgellm.api import InferenceRequestSpec
from edgellm.scheduling.layersplit import LayerPlan
from edgellm.workerapi.client import Finished, FinishReason, Text, WorkerClient
from edgellm.workerapi.errors import StagesLostError, WorkerError, WorkerFailedError
from edgellm.workerapi.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    KVTransfer,
    Message,
    RemoteStage,
    SplitPlan,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeRequest,
)

CHARACTERS_PER_TOKEN = 4
"""What a prompt not yet tokenized is estimated at: about four characters a token."""


class OutOfAttemptsError(WorkerError):
    """Every attempt the caller allowed ended with a failed worker."""


@dataclass(frozen=True)
class Job:
    """A request to run: `spec` says `prompt` or `messages` (a `promptFrom` read already)."""

    id: str
    spec: InferenceRequestSpec

    @property
    def text(self) -> str:
        """The prompt as one text, for routers that hash text rather than tokens."""
        if self.spec.messages is not None:
            return "".join(f"{m.role}\n{m.content}\n" for m in self.spec.messages)
        return self.spec.prompt or ""

    def tokenize_request(self) -> TokenizeRequest:
        """What a worker tokenizes to count the prompt as it computes it."""
        if self.spec.messages is not None:
            messages = [Message(role=m.role, content=m.content) for m in self.spec.messages]
            return TokenizeChatRequest(model=self.spec.model, messages=messages)
        return TokenizeCompletionRequest(model=self.spec.model, prompt=self.spec.prompt or "")


def estimated_tokens(job: Job, tokens: Sequence[int] | None = None) -> int:
    """The prompt's tokens: counted, when a worker tokenized it; else estimated from its text."""
    return len(tokens) if tokens is not None else len(job.text) // CHARACTERS_PER_TOKEN


@dataclass(frozen=True)
class Placement:
    """Where one attempt runs: the worker's peer and endpoint, and how its prompt's KV comes."""

    peer: str
    endpoint: str
    layers: LayerPlan | None = None
    """For a model split across peers: the plan the leading worker (`peer`) runs."""
    kv_from: str | None = None
    """Where the worker loads the prompt's KV from instead of computing it."""
    prefill_peer: str | None = None
    """The peer that computed the prompt's KV for this attempt, when another did."""


@dataclass
class Progress:
    """What the request's workers generated so far, over all its attempts."""

    text: str = ""
    tokens: int = 0
    prompt_tokens: int | None = None
    """The prompt's tokens as the first worker that computed it alone counted them: a resumed
    attempt's prompt also holds the text it goes on from."""
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None


@dataclass(frozen=True)
class Piece:
    """Generated text, and the attempt's placement that generated it."""

    text: str
    placement: Placement


@dataclass(frozen=True)
class Outcome:
    """How the request finished, counted over all its attempts."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    placement: Placement
    attempt: int
    total_seconds: float
    first_token_seconds: float | None
    kv_transfer: KVTransfer | None = None


class Hooks(Protocol):
    """What the caller decides and records around each attempt."""

    async def place(self, attempt: int, excluded: frozenset[str]) -> Placement:
        """Where attempt number `attempt` runs, without the peers in `excluded`; raises the
        caller's own error when no worker can take it."""

    async def started(self, attempt: int, placement: Placement) -> None:
        """The attempt is about to stream from its worker."""

    async def failed(
        self, attempt: int, placement: Placement, error: WorkerFailedError, lost: set[str]
    ) -> None:
        """The attempt's worker broke off; the peers in `lost` are left out from now on."""

    def ended(self, placement: Placement) -> None:
        """The attempt is over, however it ended (its generator closed included)."""


def split_plan(layers: LayerPlan) -> SplitPlan:
    """A layer plan as the leading worker reads it (`split` of its request)."""
    stages = [RemoteStage(endpoint=e, layers=n) for e, n in layers.lenders()]
    return SplitPlan(context=layers.context, leader_layers=layers.stages[0].layers, stages=stages)


def worker_request(
    job: Job, progress: Progress, placement: Placement, request_id: str
) -> GenerationRequest:
    """What a worker is asked for the next attempt: the rest of the token budget, going on
    after the text generated so far (appended to a plain prompt; for a chat, the assistant's
    unfinished message, vLLM's `continue_final_message`)."""
    sampling = job.spec.sampling
    remaining = sampling.max_tokens - progress.tokens
    if remaining < 1:
        raise ValueError(f"{job.id} has generated its {sampling.max_tokens} tokens already")
    common = {
        "model": job.spec.model,
        "max_tokens": remaining,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "seed": sampling.seed,
        "stop": sampling.stop or None,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "ignore_eos": sampling.ignore_eos,
        "request_id": request_id,
        "kv_from": placement.kv_from,
        "split": split_plan(placement.layers) if placement.layers else None,
    }
    if job.spec.messages is None:
        return CompletionRequest(prompt=(job.spec.prompt or "") + progress.text, **common)
    messages = [Message(role=m.role, content=m.content) for m in job.spec.messages]
    if not progress.text:
        return ChatCompletionRequest(messages=messages, **common)
    return ChatCompletionRequest(
        messages=[*messages, Message(role="assistant", content=progress.text)],
        add_generation_prompt=False,
        continue_final_message=True,
        **common,
    )


def lost_peers(placement: Placement, error: WorkerFailedError) -> set[str]:
    """The peers a failure leaves out: a split's lost stages, when its leader names them (it
    still serves); otherwise the worker's own peer."""
    if isinstance(error, StagesLostError) and placement.layers is not None:
        lost = placement.layers.peers_at(error.endpoints)
        if lost:
            return lost
    return {placement.peer}


async def attempts(
    client: WorkerClient,
    job: Job,
    hooks: Hooks,
    *,
    request_id: Callable[[int], str],
    progress: Progress | None = None,
    first_attempt: int = 1,
    max_attempts: int | None = None,
    http_timeout: httpx.Timeout | None = None,
) -> AsyncGenerator[Piece | Outcome, None]:
    """The request's generated text piece by piece, then how it finished.

    Goes on from `progress` (what earlier attempts generated, maybe under another operator)
    and numbers attempts from `first_attempt`; each attempt's generation is named
    `request_id(attempt)` on its worker. A worker that refuses the request raises its
    `WorkerRefusedError`; after `max_attempts` failed workers, `OutOfAttemptsError`.
    """
    progress = progress if progress is not None else Progress()
    excluded: set[str] = set()
    last = None if max_attempts is None else first_attempt + max_attempts - 1
    attempt = first_attempt
    while last is None or attempt <= last:
        placement = await hooks.place(attempt, frozenset(excluded))
        try:
            request = worker_request(job, progress, placement, request_id(attempt))
            before, fresh = progress.tokens, not progress.text
            await hooks.started(attempt, placement)
            generation = client.stream(placement.endpoint, request, http_timeout=http_timeout)
            async with aclosing(generation) as events:
                async for event in events:
                    if isinstance(event, Text):
                        if progress.first_token_at is None:
                            progress.first_token_at = time.monotonic()
                        progress.text += event.text
                        progress.tokens = before + event.completion_tokens
                        if fresh and progress.prompt_tokens is None:
                            progress.prompt_tokens = event.prompt_tokens
                        yield Piece(event.text, placement)
                        continue
                    yield _outcome(event, progress, before, fresh, placement, attempt)
                    return
        except WorkerFailedError as e:
            lost = lost_peers(placement, e)
            excluded |= lost
            await hooks.failed(attempt, placement, e, lost)
        finally:
            hooks.ended(placement)
        attempt += 1
    raise OutOfAttemptsError(f"{max_attempts} workers failed request {job.id} in turn")


def _outcome(
    finished: Finished,
    progress: Progress,
    before: int,
    fresh: bool,
    placement: Placement,
    attempt: int,
) -> Outcome:
    """The request's outcome from its last attempt's, counted over every attempt."""
    usage = finished.usage
    if fresh and progress.prompt_tokens is None:
        progress.prompt_tokens = usage.prompt_tokens
    first = progress.first_token_at
    return Outcome(
        finish_reason=finished.finish_reason,
        prompt_tokens=progress.prompt_tokens or usage.prompt_tokens,
        completion_tokens=before + usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        placement=placement,
        attempt=attempt,
        total_seconds=time.monotonic() - progress.started,
        first_token_seconds=None if first is None else first - progress.started,
        kv_transfer=finished.kv_transfer,
    )
