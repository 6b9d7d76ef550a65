"""An InferenceRequest's life: Pending -> Scheduled -> Running -> Succeeded | Failed.

The kopf daemon of each unfinished request (`app.py`) calls `RequestRunner.run`, which picks a
peer with the scheduling framework, streams the generation from the peer's worker, and writes
assignment, timings, cache figures and output into the status, with an Event at every step.
A worker that fails mid-request is excluded and the request scheduled again; deleting the
request stops the daemon, which cancels the generation on the worker.
"""

import asyncio
import base64
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
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
from edgellm.kvcache import ExternalBlockHash, prompt_block_keys
from edgellm.kvcache.index import KVIndex
from edgellm.kvcache.tokens import tokenize_on_worker
from edgellm.operator.events import EventRecorder
from edgellm.operator.metrics import OperatorMetrics
from edgellm.operator.sessions import SessionTable
from edgellm.scheduling import Candidate, Decision, Profile, schedule
from edgellm.scheduling.disaggregation import SplitDecision, decide_split
from edgellm.scheduling.layersplit import CannotSplit, LayerPlan, place

logger = logging.getLogger(__name__)

OUTPUT_KEY = "text"
Body = dict[str, Any]


class RequestFailedError(Exception):
    """The request cannot succeed; `reason` is the condition's reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StagesLostError(Exception):
    """Peers holding layers of a split model stopped answering; the leader still does."""

    def __init__(self, peers: set[str], message: str) -> None:
        super().__init__(message)
        self.peers = peers


@dataclass
class Progress:
    """What the request's workers generated so far, over all its attempts."""

    text: str = ""
    tokens: int = 0


@dataclass
class Attempt:
    """What one worker produced for the request."""

    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)


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
        self._client: httpx.AsyncClient | None = None

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
        deadline = created.timestamp() + spec.timeout_seconds
        excluded: set[str] = set()
        progress = await asyncio.to_thread(self._progress, body, status)
        if status.assignment.decode_peer is not None:
            # An operator stopped mid-request: its generation must not go on beside ours.
            await self._cancel(status.assignment.decode_peer, _generation_id(body, status))
        try:
            prompt = await asyncio.to_thread(self._prompt, spec, metadata["namespace"])
            session = f"{metadata['namespace']}/{spec.session.name}" if spec.session else None
            blocks = await self._prompt_blocks(spec, prompt)
            while True:
                warm = self.sessions.peer(session, time.monotonic()) if session else None
                candidates = self._candidates(spec.model, warm, blocks)
                with self.metrics.scheduling_duration.time():
                    decision, layers = self._schedule(spec, candidates, excluded, prompt)
                    split = (
                        None
                        if layers
                        else self._split(spec, candidates, decision, prompt, excluded)
                    )
                peer = PeerName(decision.peer.name)
                status.assignment.decode_peer = status.assignment.prefill_peer = peer
                status.assignment.cluster = decision.peer.peer.spec.cluster
                status.assignment.stages = [
                    Stage(
                        peer=PeerName(s.candidate.name),
                        first_layer=s.first_layer,
                        last_layer=s.last_layer,
                    )
                    for s in (layers.stages if layers else ())
                ]
                status.assignment.attempts += 1
                status.phase = "Scheduled"
                logger.info(
                    "%s/%s: attempt %d on %s after %d tokens",
                    metadata["namespace"],
                    metadata["name"],
                    status.assignment.attempts,
                    peer,
                    progress.tokens,
                )
                await self._transition(
                    body,
                    status,
                    "Scheduled",
                    "True",
                    "PeerChosen",
                    f"on {decision.peer.name} (attempt {status.assignment.attempts})"
                    + (f", after {progress.tokens} tokens" if progress.tokens else "")
                    + (", the session's warm peer" if warm == decision.peer.name else "")
                    + (f"; {_split_note(split)}" if split else "")
                    + (f"; the model split across peers: {layers.describe()}" if layers else ""),
                )
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise RequestFailedError(
                        "Timeout", f"not finished within {spec.timeout_seconds}s"
                    )
                attempt = Attempt()
                self.in_flight[peer] += 1
                try:
                    finished = await self._generate(
                        body,
                        status,
                        decision,
                        layers,
                        spec,
                        prompt,
                        progress,
                        attempt,
                        remaining,
                        stopped,
                    )
                except (StagesLostError, httpx.TransportError, httpx.RemoteProtocolError) as e:
                    progress = Progress(progress.text + "".join(attempt.text), attempt.tokens)
                    after = f"after {progress.tokens} tokens"
                    if isinstance(e, StagesLostError):  # the leader stands: plan around them
                        lost, reason = e.peers, "StageLost"
                        note = f"{e}; planning again without {', '.join(sorted(lost))}, {after}"
                    else:
                        lost, reason = {decision.peer.name}, "PeerLost"
                        note = f"{decision.peer.name} failed mid-request ({e}); resuming {after}"
                    excluded.update(lost)
                    await asyncio.to_thread(self.events.record, body, "Warning", reason, note)
                    continue
                finally:
                    self.in_flight[peer] -= 1
                if not finished:  # deleted: the worker was told to stop
                    return
                self._complete(status, progress, attempt, created)
                if attempt.finish_reason == "cancelled":  # stopped on the worker, not by us
                    await self._finish(
                        body,
                        status,
                        "Cancelled",
                        "CancelledOnWorker",
                        f"{decision.peer.name} stopped the generation after"
                        f" {status.output.completion_tokens if status.output else 0} tokens",
                    )
                    return
                if session and spec.session:
                    ttl = spec.session.idle_ttl_seconds
                    self.sessions.served(session, decision.peer.name, ttl, time.monotonic())
                await self._finish(
                    body,
                    status,
                    "Succeeded",
                    "Generated",
                    f"{status.output.completion_tokens if status.output else 0} tokens"
                    f" on {decision.peer.name}",
                )
                return
        except RequestFailedError as e:
            await self._finish(body, status, "Failed", e.reason, str(e))
        except TimeoutError:
            await self._finish(
                body, status, "Failed", "Timeout", f"not finished within {spec.timeout_seconds}s"
            )

    def _prompt(self, spec: InferenceRequestSpec, namespace: str) -> dict[str, Any]:
        """The worker's prompt fields, reading a Secret or ConfigMap for promptFrom."""
        if spec.prompt is not None:
            return {"prompt": spec.prompt}
        if spec.messages is not None:
            return {"messages": [m.model_dump() for m in spec.messages]}
        source = spec.prompt_from
        assert source is not None  # the spec's validation guarantees one of the three
        core = client.CoreV1Api(self.local)
        ref = source.secret_key_ref or source.config_map_key_ref
        assert ref is not None
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
        return {"prompt": value}

    def _candidates(
        self, model: str, session_peer: str | None, blocks: list[ExternalBlockHash]
    ) -> list[Candidate]:
        peers = [
            (name, peer)
            for name, body in list(self.peers.items())
            if not isinstance(peer := self.peer_models.get(body), ValidationError)
        ]
        holders = {name for name, peer in peers if any(m.name == model for m in peer.spec.models)}
        lookup = self.kv_index.lookup(blocks, holders)
        candidates = []
        for name, peer in peers:
            cached = lookup.reusable(lookup.in_memory(name))
            candidates.append(
                Candidate(
                    peer,
                    local=peer.spec.cluster == self.cluster,
                    session_warm=name == session_peer,
                    cached_fraction=cached,
                    in_flight=self.in_flight[name],
                )
            )
        return candidates

    def _http(self) -> httpx.AsyncClient:
        """One client for every worker call: a new one costs an SSL context, ~30 ms of CPU."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0))
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _prompt_blocks(
        self, spec: InferenceRequestSpec, prompt: dict[str, Any]
    ) -> list[ExternalBlockHash]:
        """The prompt's KV block hashes, as the peers' KV events name them; none while no peer
        publishes events. Tokens come from a worker of the model: the operator has no weights."""
        if not len(self.kv_index):
            return []
        holders = [
            body["spec"]["endpoint"]
            for body in list(self.peers.values())
            if any(m.get("name") == spec.model for m in body["spec"].get("models", []))
        ]
        tokens = await tokenize_on_worker(self._http(), holders, prompt)
        if tokens is None:
            return []
        blocks = prompt_block_keys(tokens, seed=self.kv_hash_seed)
        logger.debug("%d prompt tokens, %d blocks to look up", len(tokens), len(blocks))
        return blocks

    def _split(
        self,
        spec: InferenceRequestSpec,
        candidates: list[Candidate],
        decode: Decision,
        prompt: dict[str, Any],
        excluded: set[str],
    ) -> SplitDecision | None:
        """Whether a second peer should compute the prompt; None when not asked to consider it.

        The operator runs every request on one peer: moving KV between peers is the router's
        (LMCache, vLLM peers only), so here the decision is only explained.
        """
        if spec.placement.disaggregation == "never":
            return None
        others = schedule(spec, candidates, self.profile, frozenset({*excluded, decode.peer.name}))
        if not isinstance(others, Decision):
            return SplitDecision(False, "no second peer can serve the model")
        tokens = _estimated_tokens(prompt)
        return decide_split(
            spec.placement.disaggregation, others.peer.peer, decode.peer.peer, spec.model, tokens
        )

    def _schedule(
        self,
        spec: InferenceRequestSpec,
        candidates: list[Candidate],
        excluded: set[str],
        prompt: dict[str, Any],
    ) -> tuple[Decision, LayerPlan | None]:
        """The peer to run on; for a model too large for any one peer, its leader and the plan
        that splits its layers across peers."""
        tokens = _estimated_tokens(prompt)
        placed = place(spec, candidates, self.profile, tokens, frozenset(excluded))
        if isinstance(placed, Decision):
            return placed, None
        if isinstance(placed, LayerPlan):
            return Decision(placed.leader, 0.0), placed
        if isinstance(placed, CannotSplit):
            raise RequestFailedError("ModelTooLarge", placed.message)
        if not any(spec.model in {m.name for m in c.peer.spec.models} for c in candidates):
            message = f"no peer of the federation holds model {spec.model!r}; {placed.message}"
            raise RequestFailedError("UnknownModel", message)
        raise RequestFailedError("NoPeerAvailable", placed.message)

    async def _generate(
        self,
        body: Body,
        status: InferenceRequestStatus,
        decision: Decision,
        layers: LayerPlan | None,
        spec: InferenceRequestSpec,
        prompt: dict[str, Any],
        progress: Progress,
        attempt: Attempt,
        budget_seconds: float,
        stopped: asyncio.Event,
    ) -> bool:
        """Streams the generation into `attempt`; False when the request was deleted meanwhile.

        The output so far goes to the status every `progress_interval`, so that a resumed
        request (another peer, another operator) goes on from it rather than from the prompt.
        """
        endpoint = decision.peer.peer.spec.endpoint.rstrip("/")
        generation_id = _generation_id(body, status)
        sampling = spec.sampling.model_copy(
            update={"max_tokens": spec.sampling.max_tokens - progress.tokens}
        )
        payload = {
            "id": generation_id,
            **prompt,
            "continuation": progress.text,
            "sampling": sampling.to_wire(),
            "stream": True,
        }
        if layers is not None:
            payload["split"] = layers.to_worker()
        attempt.tokens = progress.tokens
        if sampling.max_tokens <= 0:  # an earlier attempt had finished; its last write was lost
            attempt.finish_reason = "length"
            return True
        status.phase = "Running"
        status.start_time = status.start_time or datetime.now(UTC)
        await self._transition(
            body, status, "Running", "True", "Generating", f"{decision.peer.name} is generating"
        )
        created = datetime.fromisoformat(body["metadata"]["creationTimestamp"])

        async def stream() -> None:
            limits = httpx.Timeout(budget_seconds, connect=5.0)
            written = time.monotonic()
            url = f"{endpoint}/v1/generate"
            async with self._http().stream("POST", url, json=payload, timeout=limits) as response:
                if response.status_code >= 400:
                    error = json.loads(await response.aread())["error"]
                    if error.get("type") == "split_error":
                        raise _split_failure(decision, layers, error)
                    message = f"{decision.peer.name}: {error['message']}"
                    raise RequestFailedError("InvalidRequest", message)
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line.removeprefix("data: "))
                    if "error" in event:
                        raise _split_failure(decision, layers, event["error"])
                    if "text" in event:
                        if status.timings.ttft_seconds is None:
                            first = (datetime.now(UTC) - created).total_seconds()
                            status.timings.ttft_seconds = round(first, 3)
                        attempt.text.append(event["text"])
                        attempt.tokens = progress.tokens + event["tokens"]
                    else:
                        attempt.finish_reason = event["finishReason"]
                        attempt.usage = event["usage"]
                    if time.monotonic() - written >= self.progress_interval:
                        text = progress.text + "".join(attempt.text)
                        status.output = Output(completion_tokens=attempt.tokens)
                        await asyncio.to_thread(self._write, body, status, text)
                        written = time.monotonic()
            if attempt.finish_reason is None:
                raise httpx.RemoteProtocolError("the stream ended without a finish reason")

        generating = asyncio.create_task(stream())
        waiting = asyncio.create_task(stopped.wait())
        done, _ = await asyncio.wait(
            {generating, waiting}, timeout=budget_seconds, return_when=asyncio.FIRST_COMPLETED
        )
        waiting.cancel()
        if generating in done:
            generating.result()  # re-raises what the stream raised
            return True
        generating.cancel()
        await self._cancel(decision.peer.name, generation_id)
        if waiting in done or stopped.is_set():
            return False
        raise TimeoutError

    async def _cancel(self, peer: str, generation_id: str) -> None:
        """Tells a peer's worker to stop a generation; it may be gone already."""
        endpoint = self.peers.get(peer, {}).get("spec", {}).get("endpoint")
        if not endpoint:
            return
        try:
            url = f"{endpoint.rstrip('/')}/v1/generate/{generation_id}"
            await self._http().delete(url, timeout=5.0)
        except httpx.HTTPError as e:
            logger.info("cancelling %s on %s: %s", generation_id, peer, e)

    def _complete(
        self,
        status: InferenceRequestStatus,
        progress: Progress,
        attempt: Attempt,
        created: datetime,
    ) -> None:
        now = datetime.now(UTC)
        usage = attempt.usage
        completion = progress.tokens + int(usage.get("completionTokens", 0))
        prompt_tokens = int(usage.get("promptTokens", 0)) or (
            status.output.prompt_tokens if status.output else 0
        )
        status.output = Output(
            text=progress.text + "".join(attempt.text),
            finish_reason=cast(FinishReason, attempt.finish_reason),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
        )
        status.cache.prompt_tokens = prompt_tokens
        status.cache.cached_tokens = int(usage.get("cachedTokens", 0))
        status.cache.source = "local" if status.cache.cached_tokens else "none"
        started = status.start_time or now
        total = (now - created).total_seconds()
        queue = max((started - created).total_seconds(), 0.0)
        ttft = status.timings.ttft_seconds or total
        # Milliseconds are all a person reads in `kubectl get ir`.
        status.timings.queue_seconds = round(queue, 3)
        status.timings.ttft_seconds = round(ttft, 3)
        status.timings.total_seconds = round(total, 3)
        status.timings.tokens_per_second = round(completion / max(total - ttft, 1e-6), 1)

    async def _transition(
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
        await asyncio.to_thread(self._write, body, status)
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
        await asyncio.to_thread(self._write, body, status)
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
        if output.config_map_ref is None:
            return Progress(output.text or "", output.completion_tokens)
        ref = output.config_map_ref
        core = client.CoreV1Api(self.local)
        data = core.read_namespaced_config_map(ref.name, body["metadata"]["namespace"]).data
        return Progress((data or {}).get(ref.key, ""), output.completion_tokens)

    def _write(self, body: Body, status: InferenceRequestStatus, text: str | None = None) -> None:
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
        objects.patch_status(
            self.local, objects.INFERENCE_REQUESTS, metadata["name"], wire, metadata["namespace"]
        )


def _generation_id(body: Body, status: InferenceRequestStatus) -> str:
    """Names one attempt on its worker: a late cancel never hits a later attempt."""
    return f"{body['metadata']['uid']}-{status.assignment.attempts}"


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


def _estimated_tokens(prompt: dict[str, Any]) -> int:
    """About four characters a token: the prompt is tokenized on the worker, not here."""
    return len(json.dumps(prompt)) // 4


def _split_failure(
    decision: Decision, layers: LayerPlan | None, error: dict[str, Any]
) -> Exception:
    """A split's failure as the leader reported it: its lost stages, or else the leader's own."""
    lost = layers.peers_at(error.get("lostStages", [])) if layers else set()
    if lost:
        return StagesLostError(lost, error["message"])
    return httpx.RemoteProtocolError(f"{decision.peer.name}: {error['message']}")


def _split_note(split: SplitDecision) -> str:
    if split.split:  # the router moves KV between peers; the operator runs on one
        return f"a prefill/decode split would pay ({split.reason}), but it is the router's"
    return f"prefill and decode not split: {split.reason}"
