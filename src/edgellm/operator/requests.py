"""An InferenceRequest's life: Pending -> Scheduled -> Running -> Succeeded | Failed.

The kopf daemon of each unfinished request (`app.py`) calls `RequestRunner.run`, which runs the
request through the attempt loop the router runs too (`edgellm.workerapi.attempts`): a peer
picked with the scheduling framework, the generation streamed from its worker, and, when that
worker fails, the rest asked of another from the text so far. What is the operator's own is
`_Lifecycle`, its hooks, which write assignment and phase into the status with an Event at
every step, and the sink that writes the output so far every `progress_interval` and, at the
end, timings, cache figures and output. Deleting the request stops the daemon, which cancels
the generation on the worker.
"""

import asyncio
import base64
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any, cast

import httpx
from kubernetes import client
from pydantic import ValidationError

from edgellm.api import (
    API_VERSION,
    ConditionStatus,
    InferenceRequestSpec,
    PeerModels,
    PeerName,
    Phase,
    set_condition,
)
from edgellm.api.inferencerequest import (
    ConfigMapRef,
    FinishReason,
    InferenceRequestStatus,
    Output,
    Stage,
)
from edgellm.kube import APIError, NotFoundError, objects, translated
from edgellm.kvcache import prompt_block_keys
from edgellm.kvcache.index import KVIndex
from edgellm.operator.events import EventRecorder
from edgellm.operator.metrics import OperatorMetrics
from edgellm.operator.sessions import SessionTable
from edgellm.scheduling import Candidate, Decision, Profile, schedule
from edgellm.scheduling.disaggregation import SplitDecision, decide_split
from edgellm.scheduling.layersplit import CannotSplit, LayerPlan, leading, place
from edgellm.workerapi import (
    Job,
    Outcome,
    Piece,
    Placement,
    Progress,
    StagesLostError,
    WorkerClient,
    WorkerError,
    WorkerFailedError,
    WorkerRefusedError,
    attempts,
    estimated_tokens,
)

logger = logging.getLogger(__name__)

OUTPUT_KEY = "text"
Body = dict[str, Any]


class RequestFailedError(Exception):
    """The request cannot succeed; `reason` is the condition's reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RequestRunner:
    def __init__(
        self,
        *,
        local: client.ApiClient,
        cluster: str,
        events: EventRecorder,
        peers: dict[str, Body],
        profile: Profile,
        progress_interval: float = 1.0,
        inline_output_limit: int = 16384,
        kv_index: KVIndex | None = None,
        kv_hash_seed: str = "0",
        peer_models: PeerModels | None = None,
        metrics: OperatorMetrics | None = None,
        workers: WorkerClient | None = None,
    ) -> None:
        self.local = local
        self.cluster = cluster
        self.events = events
        self.peers = peers  # the operator's live view: own peers and mirrors
        self.profile = profile
        self.progress_interval = progress_interval
        self.inline_output_limit = inline_output_limit
        self.sessions = SessionTable()
        self.kv_index = KVIndex() if kv_index is None else kv_index  # empty is falsy
        self.kv_hash_seed = kv_hash_seed
        self.in_flight: Counter[str] = Counter()  # generations running now, by peer
        self.peer_models = PeerModels() if peer_models is None else peer_models
        self.metrics = OperatorMetrics() if metrics is None else metrics
        # One client for every worker call: a new one costs an SSL context, ~30 ms of CPU.
        self.workers = (
            WorkerClient(timeout=httpx.Timeout(30.0, connect=5.0)) if workers is None else workers
        )

    async def close(self) -> None:
        await self.workers.aclose()

    async def run(self, body: Body, stopped: asyncio.Event) -> None:
        metadata = body["metadata"]
        created = datetime.fromisoformat(metadata["creationTimestamp"])
        try:
            spec = InferenceRequestSpec.model_validate(body["spec"])
            status = InferenceRequestStatus.model_validate(body.get("status") or {})
        except ValidationError as e:
            await self._finish(
                body, InferenceRequestStatus(), "Failed", "InvalidSpec", str(e)[:1000]
            )
            return
        progress = await asyncio.to_thread(self._progress, body, status)
        if status.assignment.decode_peer is not None:
            # An operator stopped mid-request: its generation must not go on beside ours.
            await self._cancel(
                status.assignment.decode_peer, _generation_id(body, status.assignment.attempts)
            )
        lifecycle = None
        try:
            job = Job(
                metadata["uid"], await asyncio.to_thread(self._resolve, spec, metadata["namespace"])
            )
            outcome: Outcome | None
            if progress.tokens >= spec.sampling.max_tokens:
                # An earlier attempt had finished; its last write was lost.
                outcome = _finished_before(status, progress)
            else:
                tokens = await self._prompt_tokens(job)
                lifecycle = _Lifecycle(
                    self,
                    body=body,
                    status=status,
                    job=job,
                    created=created,
                    tokens=tokens,
                    progress=progress,
                )
                outcome = await self._attempts(lifecycle, stopped)
            if outcome is None:  # deleted, or this replica paused: the worker was told to stop
                return
            await self._complete(body, status, job.spec, progress, outcome, created)
        except RequestFailedError as e:
            await self._finish(body, status, "Failed", e.reason, str(e))
        except WorkerRefusedError as e:
            peer = lifecycle.current.peer if lifecycle and lifecycle.current else "a worker"
            await self._finish(body, status, "Failed", "InvalidRequest", f"{peer}: {e}")
        except TimeoutError:
            await self._finish(
                body, status, "Failed", "Timeout", f"not finished within {spec.timeout_seconds}s"
            )

    async def _attempts(self, lifecycle: "_Lifecycle", stopped: asyncio.Event) -> Outcome | None:
        """Runs the attempts until one finishes; None when the request was deleted meanwhile
        (the worker is told to stop). TimeoutError past the request's deadline."""
        budget = lifecycle.deadline - time.time()
        generation = attempts(
            self.workers,
            lifecycle.job,
            lifecycle,
            request_id=lambda attempt: _generation_id(lifecycle.body, attempt),
            progress=lifecycle.progress,
            first_attempt=lifecycle.status.assignment.attempts + 1,
            http_timeout=httpx.Timeout(max(budget, 1.0), connect=5.0),
        )
        running = asyncio.create_task(lifecycle.write_progress(generation))
        waiting = asyncio.create_task(stopped.wait())
        done, _ = await asyncio.wait(
            {running, waiting}, timeout=max(budget, 0.0), return_when=asyncio.FIRST_COMPLETED
        )
        waiting.cancel()
        if running in done:
            return running.result()  # re-raises what the attempts raised
        running.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
        current = lifecycle.current
        if current is not None:
            await self._cancel(current.peer, _generation_id(lifecycle.body, lifecycle.attempt))
        if stopped.is_set():
            return None
        raise TimeoutError

    def _resolve(self, spec: InferenceRequestSpec, namespace: str) -> InferenceRequestSpec:
        """The spec with its prompt: a `promptFrom` read from its Secret or ConfigMap."""
        source = spec.prompt_from
        if source is None:
            return spec
        core = client.CoreV1Api(self.local)
        ref = source.secret_key_ref or source.config_map_key_ref
        assert ref is not None  # the spec's validation guarantees one of the two
        try:
            with translated():
                if source.secret_key_ref is not None:
                    data = core.read_namespaced_secret(ref.name, namespace).data or {}
                    value = base64.b64decode(data[ref.key]).decode() if ref.key in data else None
                else:
                    config_map = core.read_namespaced_config_map(ref.name, namespace)
                    value = (config_map.data or {}).get(ref.key)
        except APIError as e:
            raise RequestFailedError("PromptNotFound", f"cannot read {ref.name}: {e.reason}") from e
        if value is None:
            raise RequestFailedError("PromptNotFound", f"{ref.name} has no key {ref.key!r}")
        if not value:
            raise RequestFailedError("EmptyPrompt", f"key {ref.key!r} of {ref.name} is empty")
        return spec.model_copy(update={"prompt": value, "prompt_from": None})

    async def _prompt_tokens(self, job: Job) -> list[int] | None:
        """The prompt's tokens, for looking its KV blocks up; None while no peer publishes KV
        events. They come from a worker of the model: the operator has no weights."""
        if not len(self.kv_index):
            return None
        holders = [
            body["spec"]["endpoint"]
            for body in list(self.peers.values())
            if any(m.get("name") == job.spec.model for m in body["spec"].get("models", []))
        ]
        tokens = await self.workers.tokenize_first(holders, job.tokenize_request())
        if tokens is not None:
            logger.debug("%d prompt tokens to look up", len(tokens))
        return tokens

    def candidates(
        self, model: str, session_peer: str | None, tokens: list[int] | None
    ) -> list[Candidate]:
        peers = [
            (name, peer)
            for name, body in list(self.peers.items())
            if not isinstance(peer := self.peer_models.get(body), ValidationError)
        ]
        holders = {name for name, peer in peers if any(m.name == model for m in peer.spec.models)}
        blocks = prompt_block_keys(tokens, seed=self.kv_hash_seed) if tokens else []
        lookup = self.kv_index.lookup(blocks, holders)
        return [
            Candidate(
                peer,
                local=peer.spec.cluster == self.cluster,
                session_warm=name == session_peer,
                cached_fraction=lookup.reusable(lookup.in_memory(name)),
                in_flight=self.in_flight[name],
            )
            for name, peer in peers
        ]

    def schedule(
        self,
        spec: InferenceRequestSpec,
        candidates: list[Candidate],
        excluded: frozenset[str],
        tokens: int,
    ) -> tuple[Decision, LayerPlan | None]:
        """The peer to run on; for a model too large for any one peer, its leader and the plan
        that splits its layers across peers."""
        placed = place(spec, candidates, self.profile, tokens, excluded)
        if isinstance(placed, Decision | LayerPlan):
            self.metrics.observe_plugins(placed)
            return leading(placed)
        if isinstance(placed, CannotSplit):
            raise RequestFailedError("ModelTooLarge", placed.message)
        if not any(spec.model in {m.name for m in c.peer.spec.models} for c in candidates):
            message = f"no peer of the federation holds model {spec.model!r}; {placed.message}"
            raise RequestFailedError("UnknownModel", message)
        raise RequestFailedError("NoPeerAvailable", placed.message)

    def explain_split(
        self,
        spec: InferenceRequestSpec,
        candidates: list[Candidate],
        decode: Decision,
        excluded: frozenset[str],
        tokens: int,
    ) -> SplitDecision | None:
        """Whether a second peer should compute the prompt; None when not asked to consider it.

        The operator runs every request on one peer: moving KV between peers is the router's
        (LMCache, vLLM peers only), so here the decision is only explained.
        """
        if spec.placement.disaggregation == "never":
            return None
        others = schedule(spec, candidates, self.profile, excluded | {decode.peer.name})
        if not isinstance(others, Decision):
            return SplitDecision(False, "no second peer can serve the model")
        return decide_split(
            spec.placement.disaggregation, others.peer.peer, decode.peer.peer, spec.model, tokens
        )

    async def _cancel(self, peer: str, generation_id: str) -> None:
        """Tells a peer's worker to stop a generation; it may be gone already."""
        endpoint = self.peers.get(peer, {}).get("spec", {}).get("endpoint")
        if not endpoint:
            return
        try:
            await self.workers.cancel(endpoint, generation_id)
        except WorkerError as e:
            logger.info("cancelling %s on %s: %s", generation_id, peer, e)

    async def _complete(
        self,
        body: Body,
        status: InferenceRequestStatus,
        spec: InferenceRequestSpec,
        progress: Progress,
        outcome: Outcome,
        created: datetime,
    ) -> None:
        """Writes what the request produced, and its final phase."""
        _record_output(status, progress, outcome, created)
        peer = outcome.placement.peer
        tokens = status.output.completion_tokens if status.output else 0
        if outcome.finish_reason == "cancelled":  # stopped on the worker, not by us
            message = f"{peer} stopped the generation after {tokens} tokens"
            await self._finish(body, status, "Cancelled", "CancelledOnWorker", message)
            return
        if spec.session:
            session = f"{body['metadata']['namespace']}/{spec.session.name}"
            self.sessions.served(session, peer, spec.session.idle_ttl_seconds, time.monotonic())
        await self._finish(body, status, "Succeeded", "Generated", f"{tokens} tokens on {peer}")

    async def transition(
        self,
        body: Body,
        status: InferenceRequestStatus,
        type_: str,
        value: ConditionStatus,
        reason: str,
        message: str,
    ) -> None:
        generation = body["metadata"].get("generation")
        now = datetime.now(UTC)
        status.conditions, _ = set_condition(
            status.conditions, type_, value, reason, message, now, generation
        )
        status.observed_generation = body["metadata"].get("generation")
        await asyncio.to_thread(self.write, body, status)
        await asyncio.to_thread(self.events.record, body, "Normal", reason, message)
        self.metrics.request_phases.labels(phase=status.phase).inc()

    async def _finish(
        self, body: Body, status: InferenceRequestStatus, phase: Phase, reason: str, message: str
    ) -> None:
        # The Event first: once the status is final, kopf stops this request's daemon.
        event_type = "Normal" if phase == "Succeeded" else "Warning"
        await asyncio.to_thread(self.events.record, body, event_type, reason, message)
        status.phase = phase
        status.completion_time = datetime.now(UTC)
        status.conditions, _ = set_condition(
            status.conditions,
            "Complete",
            "True" if phase == "Succeeded" else "False",
            reason,
            message,
            datetime.now(UTC),
            body["metadata"].get("generation"),
        )
        await asyncio.to_thread(self.write, body, status)
        self.metrics.request_phases.labels(phase=phase).inc()

    def _store_output(self, body: Body, text: str) -> ConfigMapRef:
        config_map = _output_config_map(body, text)
        name, namespace = config_map["metadata"]["name"], config_map["metadata"]["namespace"]
        core = client.CoreV1Api(self.local)
        try:
            with translated():
                core.replace_namespaced_config_map(name, namespace, config_map)
        except NotFoundError:
            core.create_namespaced_config_map(namespace, config_map)
        return ConfigMapRef(name=name, key=OUTPUT_KEY)

    def _progress(self, body: Body, status: InferenceRequestStatus) -> Progress:
        """What an earlier attempt (maybe under an operator that was restarted) wrote."""
        output = status.output
        if output is None:
            return Progress()
        prompt_tokens = output.prompt_tokens or None
        if output.config_map_ref is None:
            return Progress(output.text or "", output.completion_tokens, prompt_tokens)
        ref = output.config_map_ref
        core = client.CoreV1Api(self.local)
        data = core.read_namespaced_config_map(ref.name, body["metadata"]["namespace"]).data
        return Progress((data or {}).get(ref.key, ""), output.completion_tokens, prompt_tokens)

    def write(self, body: Body, status: InferenceRequestStatus, text: str | None = None) -> None:
        """Writes the status; `text`, the output so far, inline or, when large, to a ConfigMap
        the request owns (an object's status must stay small: etcd keeps every version)."""
        metadata = body["metadata"]
        if status.output is not None:
            text = status.output.text if text is None else text
            if text is not None and len(text.encode()) > self.inline_output_limit:
                status.output.config_map_ref = self._store_output(body, text)
                status.output.text = None
            else:
                status.output.text = text
        wire = status.to_wire()
        if status.output is not None and status.output.text is None:
            wire["output"]["text"] = None  # a merge patch keeps what it does not name
        requests, name = objects.INFERENCE_REQUESTS, metadata["name"]
        objects.patch_status(self.local, requests, name, wire, metadata["namespace"])


class _Lifecycle:
    """The operator's hooks of the attempt loop for one request: each attempt's placement and
    phase in the status and Events, and the sink that writes its output as it streams."""

    def __init__(
        self,
        runner: RequestRunner,
        *,
        body: Body,
        status: InferenceRequestStatus,
        job: Job,
        created: datetime,
        tokens: list[int] | None,
        progress: Progress,
    ) -> None:
        self.runner = runner
        self.progress = progress
        self.body = body
        self.status = status
        self.job = job
        self.created = created
        self.tokens = tokens
        self.deadline = created.timestamp() + job.spec.timeout_seconds
        namespace = body["metadata"]["namespace"]
        session = job.spec.session
        self.session = f"{namespace}/{session.name}" if session else None
        self.current: Placement | None = None
        self.attempt = status.assignment.attempts

    async def place(self, attempt: int, excluded: frozenset[str]) -> Placement:
        runner, spec, status = self.runner, self.job.spec, self.status
        warm = runner.sessions.peer(self.session, time.monotonic()) if self.session else None
        candidates = runner.candidates(spec.model, warm, self.tokens)
        tokens = estimated_tokens(self.job, self.tokens)
        with runner.metrics.scheduling_duration.time():
            decision, layers = runner.schedule(spec, candidates, excluded, tokens)
            split = (
                None
                if layers
                else runner.explain_split(spec, candidates, decision, excluded, tokens)
            )
        peer = PeerName(decision.peer.name)
        status.assignment.decode_peer = status.assignment.prefill_peer = peer
        status.assignment.cluster = decision.peer.peer.spec.cluster
        status.assignment.stages = [
            Stage(
                peer=PeerName(s.candidate.name), first_layer=s.first_layer, last_layer=s.last_layer
            )
            for s in (layers.stages if layers else ())
        ]
        status.assignment.attempts = self.attempt = attempt
        status.phase = "Scheduled"
        metadata = self.body["metadata"]
        done = self.progress.tokens
        logger.info(
            "%s/%s: attempt %d on %s after %d tokens",
            metadata["namespace"],
            metadata["name"],
            attempt,
            peer,
            done,
        )
        await runner.transition(
            self.body,
            status,
            "Scheduled",
            "True",
            "PeerChosen",
            f"on {peer} (attempt {attempt})"
            + (f", after {done} tokens" if done else "")
            + (", the session's warm peer" if warm == peer else "")
            + (f"; {_split_note(split)}" if split else "")
            + (f"; the model split across peers: {layers.describe()}" if layers else ""),
        )
        if time.time() >= self.deadline:
            raise RequestFailedError("Timeout", f"not finished within {spec.timeout_seconds}s")
        self.current = Placement(peer, decision.peer.peer.spec.endpoint, layers)
        return self.current

    async def started(self, attempt: int, placement: Placement) -> None:
        self.runner.in_flight[placement.peer] += 1
        self.status.phase = "Running"
        self.status.start_time = self.status.start_time or datetime.now(UTC)
        message = f"{placement.peer} is generating"
        await self.runner.transition(
            self.body, self.status, "Running", "True", "Generating", message
        )

    async def failed(
        self, attempt: int, placement: Placement, error: WorkerFailedError, lost: set[str]
    ) -> None:
        after = f"after {self.progress.tokens} tokens"
        if isinstance(error, StagesLostError) and lost != {placement.peer}:
            reason = "StageLost"  # the leader stands: plan around its lost stages
            note = f"{error}; planning again without {', '.join(sorted(lost))}, {after}"
        else:
            reason = "PeerLost"
            note = f"{placement.peer} failed mid-request ({error}); resuming {after}"
        await asyncio.to_thread(self.runner.events.record, self.body, "Warning", reason, note)

    def ended(self, placement: Placement) -> None:
        self.runner.in_flight[placement.peer] -= 1

    async def write_progress(self, generation: AsyncGenerator[Piece | Outcome, None]) -> Outcome:
        """Consumes the attempts: the time to the first token, and the output so far every
        `progress_interval`, so that a resumed request (another peer, another operator) goes
        on from it rather than from the prompt."""
        progress, written = self.progress, time.monotonic()
        async with aclosing(generation) as events:
            async for event in events:
                if isinstance(event, Outcome):
                    return event
                if self.status.timings.ttft_seconds is None:
                    first = (datetime.now(UTC) - self.created).total_seconds()
                    self.status.timings.ttft_seconds = round(first, 3)
                if time.monotonic() - written >= self.runner.progress_interval:
                    self.status.output = Output(
                        prompt_tokens=progress.prompt_tokens or 0,
                        completion_tokens=progress.tokens,
                    )
                    await asyncio.to_thread(
                        self.runner.write, self.body, self.status, progress.text
                    )
                    written = time.monotonic()
        raise RuntimeError("the attempts ended without an outcome")


def _generation_id(body: Body, attempt: int) -> str:
    """Names one attempt on its worker: a late cancel never hits a later attempt."""
    return f"{body['metadata']['uid']}-{attempt}"


def _finished_before(status: InferenceRequestStatus, progress: Progress) -> Outcome:
    """The outcome of a request whose tokens were all generated before (by an attempt whose
    last write was lost)."""
    peer = status.assignment.decode_peer or ""
    return Outcome(
        finish_reason="length",
        prompt_tokens=progress.prompt_tokens or 0,
        completion_tokens=progress.tokens,
        cached_tokens=status.cache.cached_tokens,
        placement=Placement(peer, ""),
        attempt=status.assignment.attempts,
        total_seconds=0.0,
        first_token_seconds=None,
    )


def _record_output(
    status: InferenceRequestStatus, progress: Progress, outcome: Outcome, created: datetime
) -> None:
    """The output, cache figures and timings of a request that finished."""
    now = datetime.now(UTC)
    status.output = Output(
        text=progress.text,
        finish_reason=cast(FinishReason, outcome.finish_reason),
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
    )
    status.cache.prompt_tokens = outcome.prompt_tokens
    status.cache.cached_tokens = outcome.cached_tokens
    status.cache.source = "local" if outcome.cached_tokens else "none"
    started = status.start_time or now
    total = (now - created).total_seconds()
    queue = max((started - created).total_seconds(), 0.0)
    ttft = status.timings.ttft_seconds or total
    # Milliseconds are all a person reads in `kubectl get ir`.
    status.timings.queue_seconds = round(queue, 3)
    status.timings.ttft_seconds = round(ttft, 3)
    status.timings.total_seconds = round(total, 3)
    status.timings.tokens_per_second = round(outcome.completion_tokens / max(total - ttft, 1e-6), 1)


def _output_config_map(body: Body, text: str) -> dict[str, Any]:
    metadata = body["metadata"]
    return {
        "metadata": {
            "name": f"{metadata['name'][:246]}-output",
            "namespace": metadata["namespace"],
            "labels": {"edgellm.io/inference-request": metadata["name"][:63]},
            # Deleted with its request by the garbage collector.
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "InferenceRequest",
                    "name": metadata["name"],
                    "uid": metadata["uid"],
                }
            ],
        },
        "data": {OUTPUT_KEY: text},
    }


def _split_note(split: SplitDecision) -> str:
    if split.split:  # the router moves KV between peers; the operator runs on one
        return f"a prefill/decode split would pay ({split.reason}), but it is the router's"
    return f"prefill and decode not split: {split.reason}"
