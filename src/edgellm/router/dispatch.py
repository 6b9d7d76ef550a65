"""One request through the router: its prompt looked up, a worker chosen by the scheduling
plugins, the tokens streamed back; and, when that worker fails, the rest asked of another.

The attempts are `edgellm.workerapi.attempts`, which the operator runs too: the worker is
always asked to stream, whatever the client asked, and a worker lost mid-generation leaves the
text so far, which the next one goes on from with the rest of the token budget. The client
sees one answer and no error as long as some worker of the model is left. What is the router's
own is `_Routing`, its hooks: where each attempt goes (KV-aware placement, a prefill on a
second peer, KV from IPFS) and what it records (routing metrics, requests in flight, failures).

Errors, for the app to turn into HTTP answers (a worker's own refusal is the worker API's
`WorkerRefusedError`, answered with its status):

    DispatchError
    ├── UnknownModelError     no peer of the federation holds the model (404)
    └── NoWorkerError         peers hold it, none can take it now, or all failed (503)
"""

import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from edgellm.kvcache import ExternalBlockHash, prompt_block_keys
from edgellm.kvcache.index import KVIndex, PromptLookup, leading_matches
from edgellm.router.metrics import RouterMetrics
from edgellm.router.peers import PeerDirectory
from edgellm.router.policies import Policy, RoutingHistory, policy_profile, text_chunk_keys
from edgellm.router.tokenizers import GgufTokenizer
from edgellm.scheduling import Candidate, Decision, Profile, schedule
from edgellm.scheduling.disaggregation import decide_split
from edgellm.scheduling.layersplit import LayerPlan, leading, place
from edgellm.workerapi import (
    ClientBusyError,
    Job,
    Outcome,
    OutOfAttemptsError,
    Piece,
    Placement,
    Progress,
    WorkerClient,
    WorkerError,
    WorkerFailedError,
    attempts,
    estimated_tokens,
)
from edgellm.workerapi.attempts import worker_request

logger = logging.getLogger(__name__)


class DispatchError(Exception):
    pass


class UnknownModelError(DispatchError):
    pass


class NoWorkerError(DispatchError):
    pass


@dataclass(frozen=True)
class PromptKeys:
    """What the policy looks the prompt up by: KV block hashes (with the tokens they hash),
    or text chunk hashes; none for the policies that ignore the prompt."""

    blocks: list[ExternalBlockHash] = field(default_factory=list)
    text: list[int] = field(default_factory=list)
    tokens: list[int] | None = None


@dataclass(frozen=True)
class _KVSource:
    """Where the decode worker gets the prompt's KV instead of computing it."""

    peer: str
    kv_from: str | None  # what it fetches (llama.cpp); None: LMCache moves it (vLLM)
    prefilled: bool  # computed for this request by `peer`, rather than found in IPFS


class Dispatcher:
    def __init__(
        self,
        *,
        peers: PeerDirectory,
        index: KVIndex,
        client: WorkerClient,
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

    async def run(self, job: Job) -> AsyncGenerator[Piece | Outcome, None]:
        """The generated text piece by piece, then how it finished."""
        if not self.peers.holders(job.spec.model):
            raise UnknownModelError(f"no peer of the federation holds model {job.spec.model!r}")
        started = time.perf_counter()
        routing = _Routing(self, job=job, keys=await self._prompt_keys(job), since=started)
        generation = attempts(
            self.client,
            job,
            routing,
            request_id=lambda attempt: f"{job.id}-{attempt}",
            max_attempts=self.max_attempts,
        )
        try:
            async with aclosing(generation) as events:
                async for event in events:
                    if isinstance(event, Outcome) and event.kv_transfer is not None:
                        self.metrics.kv_transfer_seconds.observe(event.kv_transfer.seconds)
                        self.metrics.kv_loads.labels(event.kv_transfer.source).inc()
                    yield event
        except OutOfAttemptsError as e:
            raise NoWorkerError(str(e)) from e
        except ClientBusyError as e:  # the router's own connections are all busy
            raise NoWorkerError("the router is saturated: no connection to a worker is free") from e

    async def explain(self, job: Job) -> dict[str, Any]:
        """What the router knows of a prompt's KV, without routing it: blocks held in each
        peer's memory, and the longest prefix in IPFS (for people, and for tests to wait on)."""
        blocks = (await self._prompt_keys(job)).blocks
        lookup = self.index.lookup(blocks, self._holder_names(job))
        in_memory = {name: self._held(lookup, name) for name in self._holder_names(job)}
        in_ipfs = lookup.in_ipfs
        return {
            "blocks": len(blocks),
            "inMemory": {name: held for name, held in in_memory.items() if held},
            "inIPFS": {"peer": in_ipfs[0], "blocks": in_ipfs[1]} if in_ipfs else None,
        }

    async def _prompt_keys(self, job: Job) -> PromptKeys:
        if self.policy == "approx-prefix":
            return PromptKeys(text=text_chunk_keys(job.text))
        if self.policy != "kv-aware":
            return PromptKeys()
        tokenizer = self.tokenizers.get(job.spec.model)
        if tokenizer is not None:
            tokens: list[int] | None = tokenizer.tokens(job.tokenize_request())
        else:
            endpoints = [p.spec.endpoint for p in self.peers.holders(job.spec.model)]
            tokens = await self.client.tokenize_first(endpoints, job.tokenize_request())
        if tokens is None:
            return PromptKeys()
        blocks = prompt_block_keys(tokens, seed=self.hash_seed, block_size=self.block_size)
        return PromptKeys(blocks=blocks, tokens=tokens)

    def place(
        self, job: Job, keys: PromptKeys, excluded: frozenset[str]
    ) -> tuple[Decision, LayerPlan | None]:
        """The worker to ask; for a model too large for any one peer, the leader of a split
        and its plan."""
        candidates = self._candidates(job, keys)
        tokens = estimated_tokens(job, keys.tokens)
        placed = place(job.spec, candidates, self.profile, tokens, excluded | self.peers.failing())
        if isinstance(placed, Decision | LayerPlan):
            self.metrics.observe_plugins(placed)
            return leading(placed)
        raise NoWorkerError(f"no worker can take model {job.spec.model!r} now: {placed.message}")

    def route(self, job: Job, keys: PromptKeys, excluded: frozenset[str]) -> Decision | None:
        """The one peer that would serve the request, if any can."""
        candidates = self._candidates(job, keys)
        result = schedule(job.spec, candidates, self.profile, excluded | self.peers.failing())
        return result if isinstance(result, Decision) else None

    def _candidates(self, job: Job, keys: PromptKeys) -> list[Candidate]:
        candidates = []
        lookup = self.index.lookup(keys.blocks, self._holder_names(job))
        for name, peer in self.peers.peers.items():
            if keys.blocks:
                cached = lookup.reusable(self._held(lookup, name))
            elif keys.text:
                cached = self.history.matched(name, keys.text) / len(keys.text)
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

    def from_ipfs(
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

    async def prefill(
        self, job: Job, decode: Decision, keys: PromptKeys, excluded: frozenset[str]
    ) -> _KVSource | None:
        """Computes the prompt on a second peer when that beats computing it on `decode`
        (`decide_split`); None when the request stays on one peer, or the prefill failed."""
        mode = job.spec.placement.disaggregation
        if mode == "never":
            return None
        others = self.route(job, PromptKeys(blocks=keys.blocks), excluded | {decode.peer.name})
        if others is None:
            return None
        # What `decode` would compute itself: the prompt less what it holds already.
        held = self.index.matched_blocks(decode.peer.name, keys.blocks) * self.block_size
        tokens = estimated_tokens(job, keys.tokens)
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
        placement = Placement(peer.name, endpoint)
        try:
            if split.backend == "vllm":
                # LMCache's producer stores the KV as vLLM computes it: one token computes it all.
                one = job.spec.model_copy(
                    update={"sampling": job.spec.sampling.model_copy(update={"max_tokens": 1})}
                )
                request = worker_request(Job(job.id, one), Progress(), placement, prefill_id)
                async with aclosing(self.client.stream(endpoint, request)) as events:
                    async for _ in events:
                        pass
                return _KVSource(peer.name, None, prefilled=True)
            request = worker_request(job, Progress(), placement, prefill_id)
            await self.client.prefill(endpoint, request)
        except WorkerError as e:
            logger.warning(
                "prefill on %s failed, computing on %s: %s", peer.name, decode.peer.name, e
            )
            return None
        return _KVSource(peer.name, f"{endpoint}/v1/kv/{prefill_id}", prefilled=True)


class _Routing:
    """The router's hooks of the attempt loop for one request."""

    def __init__(self, dispatcher: Dispatcher, *, job: Job, keys: PromptKeys, since: float) -> None:
        """`since`: when routing began (`time.perf_counter`), the prompt's lookup included."""
        self.dispatcher = dispatcher
        self.job = job
        self.keys = keys
        self.since = since
        self._pending: set[ExternalBlockHash] = set()

    async def place(self, attempt: int, excluded: frozenset[str]) -> Placement:
        d, job = self.dispatcher, self.job
        decision, layers = d.place(job, self.keys, excluded)
        peer = decision.peer.name
        if attempt == 1:
            d.metrics.routing_seconds.observe(time.perf_counter() - self.since)
        d.metrics.decisions.labels(d.policy, peer).inc()
        # Counted before a prefill runs elsewhere: the peer is this request's from now on.
        d.history.record(peer, self.keys.text)
        d.peers.in_flight[peer] += 1
        self._pending = set(self.keys.blocks)
        d._pending.setdefault(peer, []).append(self._pending)
        # A P/D split is for the first attempt only: a retry computes what it needs itself;
        # a model split by layers computes its prompt across its stages.
        source = None
        if layers is None:
            if attempt == 1:
                source = await d.prefill(job, decision, self.keys, excluded)
            source = source or d.from_ipfs(job, decision, self.keys.blocks)
        return Placement(
            peer,
            decision.peer.peer.spec.endpoint,
            layers,
            kv_from=source.kv_from if source else None,
            prefill_peer=source.peer if source and source.prefilled else None,
        )

    async def started(self, attempt: int, placement: Placement) -> None:
        pass  # counted at placement

    async def failed(
        self, attempt: int, placement: Placement, error: WorkerFailedError, lost: set[str]
    ) -> None:
        logger.warning(
            "%s failed request %s (attempt %d): %s", placement.peer, self.job.id, attempt, error
        )
        for peer in lost:
            self.dispatcher.metrics.worker_failures.labels(peer).inc()
            self.dispatcher.peers.failed(peer)

    def ended(self, placement: Placement) -> None:
        self.dispatcher.peers.in_flight[placement.peer] -= 1
        self.dispatcher._pending[placement.peer].remove(self._pending)
