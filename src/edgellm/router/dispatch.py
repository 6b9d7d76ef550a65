"""One request through the router: its prompt looked up, a worker chosen by the scheduling
plugins, the tokens streamed back; and, when that worker fails, the rest asked of another.

The worker is always asked to stream, whatever the client asked: a worker lost mid-generation
leaves the text so far, and the next worker continues it (`continuation`, with the rest of the
token budget), as the operator resumes an InferenceRequest. The client sees one answer and no
error as long as some worker of the model is left.

Errors, for the app to turn into HTTP answers:

    DispatchError
    ├── UnknownModelError     no peer of the federation holds the model (404)
    ├── NoWorkerError         peers hold it, none can take it now, or all failed (503)
    └── WorkerRefusedError    a worker refused the request itself, e.g. too long (its 4xx)
"""

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from edgellm.api import InferenceRequestSpec
from edgellm.kvcache import ExternalBlockHash, prompt_block_keys
from edgellm.kvcache.index import KVIndex, PromptLookup, leading_matches
from edgellm.kvcache.tokens import tokenize_on_worker
from edgellm.router.metrics import RouterMetrics
from edgellm.router.peers import PeerDirectory
from edgellm.router.policies import Policy, RoutingHistory, policy_profile, text_chunk_keys
from edgellm.router.tokenizers import GgufTokenizer
from edgellm.scheduling import Candidate, Decision, Profile, schedule
from edgellm.scheduling.disaggregation import decide_split
from edgellm.scheduling.layersplit import LayerPlan, place

logger = logging.getLogger(__name__)


class DispatchError(Exception):
    pass


class UnknownModelError(DispatchError):
    pass


class NoWorkerError(DispatchError):
    pass


class WorkerRefusedError(DispatchError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _WorkerFailedError(Exception):
    """The worker broke off (not the request's fault): try another. With `peers`, the worker
    leads a split and those of its stages failed: plan again without them."""

    def __init__(self, message: str, peers: set[str] | None = None) -> None:
        super().__init__(message)
        self.peers = peers


@dataclass(frozen=True)
class Job:
    id: str
    spec: InferenceRequestSpec

    @property
    def prompt(self) -> dict[str, Any]:
        """The prompt as the worker API takes it."""
        if self.spec.messages is not None:
            return {"messages": [m.model_dump() for m in self.spec.messages]}
        return {"prompt": self.spec.prompt}

    @property
    def text(self) -> str:
        """The prompt as one text, for routers that hash text rather than tokens."""
        if self.spec.messages is not None:
            return "".join(f"{m.role}\n{m.content}\n" for m in self.spec.messages)
        return self.spec.prompt or ""


@dataclass(frozen=True)
class Piece:
    text: str
    peer: str
    prefill_peer: str | None = None


@dataclass
class Finished:
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    peer: str
    attempts: int
    total_seconds: float
    first_token_seconds: float | None
    prefill_peer: str | None = None


@dataclass(frozen=True)
class _KVSource:
    """Where the decode worker gets the prompt's KV instead of computing it."""

    peer: str
    kv_from: str | None  # what it fetches (llama.cpp); None: LMCache moves it (vLLM)
    prefilled: bool  # computed for this request by `peer`, rather than found in IPFS


@dataclass
class _Progress:
    """What the client already has, across attempts."""

    text: str = ""
    tokens: int = 0
    first_token_at: float | None = None
    started: float = field(default_factory=time.monotonic)


class Dispatcher:
    def __init__(
        self,
        peers: PeerDirectory,
        index: KVIndex,
        client: httpx.AsyncClient,
        metrics: RouterMetrics,
        policy: Policy = "kv-aware",
        profile: Profile | None = None,
        cluster: str | None = None,
        hash_seed: str = "0",
        block_size: int = 16,
        tokenizers: dict[str, GgufTokenizer] | None = None,
        max_attempts: int = 3,
    ) -> None:
        self.peers = peers
        self.index = index
        self.client = client
        self.metrics = metrics
        self.policy = policy
        self.profile = policy_profile(policy, profile)
        self.cluster = cluster
        self.hash_seed = hash_seed
        self.block_size = block_size
        self.tokenizers = tokenizers or {}
        self.max_attempts = max_attempts
        self.history = RoutingHistory()
        # The blocks of the prompts each peer is computing now: it will hold them before its KV
        # events can say so, and a request sharing them should follow rather than recompute.
        self._pending: dict[str, list[set[ExternalBlockHash]]] = {}

    async def run(self, job: Job) -> AsyncGenerator[Piece | Finished, None]:
        """The generated text piece by piece, then how it finished."""
        if not self.peers.holders(job.spec.model):
            raise UnknownModelError(f"no peer of the federation holds model {job.spec.model!r}")
        started = time.perf_counter()
        blocks, text_keys = await self._prompt_keys(job)
        progress, excluded = _Progress(), set[str]()
        for attempt in range(1, self.max_attempts + 1):
            decision, layers = self._place(job, blocks, text_keys, frozenset(excluded))
            peer = decision.peer.name
            if attempt == 1:
                self.metrics.routing_seconds.observe(time.perf_counter() - started)
            self.metrics.decisions.labels(self.policy, peer).inc()
            self.history.record(peer, text_keys)
            self.peers.in_flight[peer] += 1
            pending = set(blocks)
            self._pending.setdefault(peer, []).append(pending)
            try:
                # A P/D split is for the first attempt only: a retry computes what it needs itself;
                # a model split by layers computes its prompt across its stages.
                source = None
                if layers is None:
                    split = (
                        await self._prefill(job, decision, blocks, excluded)
                        if attempt == 1
                        else None
                    )
                    source = split or self._from_ipfs(job, decision, blocks)
                generation = self._generate(job, decision, attempt, progress, source, layers)
                async for piece in generation:
                    yield piece
                return
            except _WorkerFailedError as e:
                logger.warning("%s failed request %s (attempt %d): %s", peer, job.id, attempt, e)
                for failed in e.peers or {peer}:
                    self.metrics.worker_failures.labels(failed).inc()
                    self.peers.failed(failed)
                    excluded.add(failed)
            finally:
                self.peers.in_flight[peer] -= 1
                self._pending[peer].remove(pending)
        raise NoWorkerError(f"{self.max_attempts} workers failed this request in turn")

    async def explain(self, job: Job) -> dict[str, Any]:
        """What the router knows of a prompt's KV, without routing it: blocks held in each
        peer's memory, and the longest prefix in IPFS (for people, and for tests to wait on)."""
        blocks, _ = await self._prompt_keys(job)
        lookup = self.index.lookup(blocks, self._holder_names(job))
        in_memory = {name: self._held(lookup, name) for name in self._holder_names(job)}
        in_ipfs = lookup.in_ipfs
        return {
            "blocks": len(blocks),
            "inMemory": {name: held for name, held in in_memory.items() if held},
            "inIPFS": {"peer": in_ipfs[0], "blocks": in_ipfs[1]} if in_ipfs else None,
        }

    async def _prompt_keys(self, job: Job) -> tuple[list[ExternalBlockHash], list[int]]:
        """What the policy looks the prompt up by: KV block hashes, or text chunk hashes."""
        if self.policy == "approx-prefix":
            return [], text_chunk_keys(job.text)
        if self.policy != "kv-aware":
            return [], []
        tokenizer = self.tokenizers.get(job.spec.model)
        if tokenizer is not None:
            tokens: list[int] | None = tokenizer.tokens(job.prompt)
        else:
            endpoints = [p.spec.endpoint for p in self.peers.holders(job.spec.model)]
            tokens = await tokenize_on_worker(self.client, endpoints, job.prompt)
        if tokens is None:
            return [], []
        return prompt_block_keys(tokens, seed=self.hash_seed, block_size=self.block_size), []

    def _place(
        self,
        job: Job,
        blocks: list[ExternalBlockHash],
        text_keys: list[int],
        excluded: frozenset[str],
    ) -> tuple[Decision, LayerPlan | None]:
        """The worker to ask; for a model too large for any one peer, the leader of a split
        and its plan."""
        candidates = self._candidates(job, blocks, text_keys)
        tokens = len(blocks) * self.block_size if blocks else len(job.text) // 4
        placed = place(job.spec, candidates, self.profile, tokens, excluded | self.peers.failing())
        if isinstance(placed, Decision):
            return placed, None
        if isinstance(placed, LayerPlan):
            return Decision(placed.leader, 0.0), placed
        raise NoWorkerError(f"no worker can take model {job.spec.model!r} now: {placed.message}")

    def _route(
        self,
        job: Job,
        blocks: list[ExternalBlockHash],
        text_keys: list[int],
        excluded: frozenset[str],
    ) -> Decision:
        candidates = self._candidates(job, blocks, text_keys)
        result = schedule(job.spec, candidates, self.profile, excluded | self.peers.failing())
        if not isinstance(result, Decision):
            raise NoWorkerError(
                f"no worker can take model {job.spec.model!r} now: {result.message}"
            )
        return result

    def _candidates(
        self, job: Job, blocks: list[ExternalBlockHash], text_keys: list[int]
    ) -> list[Candidate]:
        candidates = []
        lookup = self.index.lookup(blocks, self._holder_names(job))
        for name, peer in self.peers.peers.items():
            if blocks:
                cached = lookup.reusable(self._held(lookup, name))
            elif text_keys:
                cached = self.history.matched(name, text_keys) / len(text_keys)
            else:
                cached = 0.0
            candidates.append(
                Candidate(
                    peer,
                    local=peer.spec.cluster == self.cluster,
                    cached_fraction=cached,
                    in_flight=self.peers.in_flight[name],
                )
            )
        return candidates

    def _held(self, lookup: PromptLookup, peer: str) -> int:
        """The prompt's leading blocks `peer` has in memory, or is computing now."""
        held = lookup.in_memory(peer)
        for pending in self._pending.get(peer, ()):
            held = max(held, leading_matches(lookup.prompt, pending))
        return held

    def _holder_names(self, job: Job) -> set[str]:
        return {p.metadata.name for p in self.peers.holders(job.spec.model)}

    def _from_ipfs(
        self, job: Job, decode: Decision, blocks: list[ExternalBlockHash]
    ) -> _KVSource | None:
        """The announcement of the longest prefix of the prompt in IPFS, when it is longer than
        what `decode` holds in memory: the decode worker loads it through its own Kubo."""
        lookup = self.index.lookup(blocks, self._holder_names(job))
        # In memory only: what the peer is computing now includes this very request.
        if lookup.in_ipfs is None or lookup.in_ipfs[1] <= lookup.in_memory(decode.peer.name):
            return None
        holder, count = lookup.in_ipfs
        announcer = self.peers.peers.get(holder)
        if announcer is None:
            return None
        url = f"{announcer.spec.endpoint.rstrip('/')}/v1/kv/ipfs/{blocks[count - 1]}"
        return _KVSource(holder, url, prefilled=False)

    async def _prefill(
        self,
        job: Job,
        decode: Decision,
        blocks: list[ExternalBlockHash],
        excluded: set[str],
    ) -> _KVSource | None:
        """Computes the prompt on a second peer when that beats computing it on `decode`
        (`decide_split`); None when the request stays on one peer, or the prefill failed."""
        mode = job.spec.placement.disaggregation
        if mode == "never":
            return None
        others = self._route_or_none(job, blocks, frozenset({*excluded, decode.peer.name}))
        if others is None:
            return None
        # What `decode` would compute itself: the prompt less what it holds already.
        held = self.index.matched_blocks(decode.peer.name, blocks) * self.block_size
        tokens = len(blocks) * self.block_size if blocks else len(job.text) // 4
        split = decide_split(
            mode, others.peer.peer, decode.peer.peer, job.spec.model, tokens - held
        )
        self.metrics.disaggregation.labels(str(split.split).lower()).inc()
        logger.info("request %s: split %s: %s", job.id, split.split, split.reason)
        if not split.split:
            return None
        peer = others.peer
        endpoint = peer.peer.spec.endpoint.rstrip("/")
        prefill_id = f"{job.id}-prefill"
        body = {**job.prompt, "id": prefill_id, "sampling": job.spec.sampling.to_wire()}
        try:
            if split.backend == "vllm":
                # LMCache's producer stores the KV as vLLM computes it: one token computes it all.
                sampling = job.spec.sampling.model_copy(update={"max_tokens": 1})
                body["sampling"] = sampling.to_wire()
                (await self.client.post(f"{endpoint}/v1/generate", json=body)).raise_for_status()
                return _KVSource(peer.name, None, prefilled=True)
            response = await self.client.post(f"{endpoint}/v1/prefill", json=body)
            response.raise_for_status()
        except httpx.HTTPError as e:
            logger.warning(
                "prefill on %s failed, computing on %s: %s", peer.name, decode.peer.name, e
            )
            return None
        return _KVSource(peer.name, f"{endpoint}/v1/kv/{prefill_id}", prefilled=True)

    def _route_or_none(
        self, job: Job, blocks: list[ExternalBlockHash], excluded: frozenset[str]
    ) -> Decision | None:
        try:
            return self._route(job, blocks, [], excluded)
        except NoWorkerError:
            return None

    async def _generate(
        self,
        job: Job,
        decision: Decision,
        attempt: int,
        progress: _Progress,
        source: _KVSource | None,
        layers: LayerPlan | None,
    ) -> AsyncIterator[Piece | Finished]:
        sampling = job.spec.sampling.model_copy(
            update={"max_tokens": job.spec.sampling.max_tokens - progress.tokens}
        )
        body = {
            **job.prompt,
            "id": f"{job.id}-{attempt}",
            "continuation": progress.text,
            "sampling": sampling.to_wire(),
            "stream": True,
            **({"kvFrom": source.kv_from} if source and source.kv_from else {}),
            **({"split": layers.to_worker()} if layers else {}),
        }
        prefill_peer = source.peer if source and source.prefilled else None
        url = f"{decision.peer.peer.spec.endpoint.rstrip('/')}/v1/generate"
        done_before = progress.tokens
        try:
            async with self.client.stream("POST", url, json=body) as response:
                if response.status_code >= 500:
                    await response.aread()
                    if layers is not None:
                        raise _split_failure(_json(response), layers)
                    raise _WorkerFailedError(f"answered {response.status_code}")
                if response.status_code >= 400:
                    await response.aread()
                    raise WorkerRefusedError(response.status_code, _message(response))
                finished = None
                # Read to the end, [DONE] included: a stream left unread loses its connection.
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line.removeprefix("data: "))
                    if "error" in event:  # a split's leader lost stages
                        raise _split_failure(event, layers)
                    if "text" in event:
                        if progress.first_token_at is None:
                            progress.first_token_at = time.monotonic()
                        progress.text += event["text"]
                        progress.tokens = done_before + event["tokens"]
                        yield Piece(event["text"], decision.peer.name, prefill_peer)
                    elif "finishReason" in event:
                        finished = event
                        transfer = event["usage"].get("kvTransfer")
                        if transfer:
                            self.metrics.kv_transfer_seconds.observe(transfer["seconds"])
                            self.metrics.kv_loads.labels(transfer.get("source", "peer")).inc()
        except httpx.PoolTimeout as e:  # the router's own connections are all busy
            raise NoWorkerError("the router is saturated: no connection to a worker is free") from e
        except httpx.TransportError as e:
            raise _WorkerFailedError(str(e) or type(e).__name__) from e
        if finished is None:
            raise _WorkerFailedError("the stream ended without finishing")
        usage = finished["usage"]
        yield Finished(
            finish_reason=finished["finishReason"],
            prompt_tokens=usage["promptTokens"],
            completion_tokens=done_before + usage["completionTokens"],
            cached_tokens=usage["cachedTokens"],
            peer=decision.peer.name,
            attempts=attempt,
            total_seconds=time.monotonic() - progress.started,
            first_token_seconds=None
            if progress.first_token_at is None
            else progress.first_token_at - progress.started,
            prefill_peer=prefill_peer,
        )


def _split_failure(body: Any, layers: LayerPlan | None) -> _WorkerFailedError:
    """A split's leader's error: the stages it lost, or else its own failure."""
    error = body.get("error", {}) if isinstance(body, dict) else {}
    lost = layers.peers_at(error.get("lostStages", [])) if layers else set()
    return _WorkerFailedError(str(error.get("message", "the split failed")), lost or None)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]
