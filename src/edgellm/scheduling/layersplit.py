"""Placing a model too large for any one peer: its layers split across several peers.

A peer that holds the model's weights leads (it loads the GGUF, keeps the first layers and
samples); peers that run a llama.cpp RPC server (`spec.rpcServer`) hold the rest. The plan:

1. The peers that may take part pass the same health, trust, cluster and selector filters as
   any placement (`SHARED_FILTERS`).
2. Each layer needs its share of the weights plus its KV cache for the request's context;
   a peer holds as many whole layers as its memory allows.
3. Peers are added, the leader's own region and cluster first (consecutive stages then talk
   over short links), the largest first within each (fewer stages, fewer hops), until their
   memory holds every layer.
4. Layers go to peers in proportion to their cores (speed), none past its memory, in the
   order the peers were added, so each hop crosses as few regions as possible.

Pure, like `framework.schedule`: the operator passes the candidates it has, and an impossible
plan says why with the figures.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from edgellm.api import InferenceRequestSpec, quantity_value
from edgellm.api.peernode import LocalModel
from edgellm.scheduling.framework import (
    Candidate,
    Decision,
    Filter,
    Profile,
    Unschedulable,
    schedule,
)
from edgellm.scheduling.plugins import (
    Decodes,
    Healthy,
    InClusters,
    MatchesSelector,
    Trusted,
    peer_memory,
)

SHARED_FILTERS: Final[tuple[Filter, ...]] = (Healthy(), Trusted(), InClusters(), MatchesSelector())
"""What every peer of a split must pass: the request's constraints apply to all its layers."""
MIN_CONTEXT: Final = 512


@dataclass(frozen=True)
class StagePlan:
    candidate: Candidate
    first_layer: int
    last_layer: int  # inclusive

    @property
    def layers(self) -> int:
        return self.last_layer - self.first_layer + 1


@dataclass(frozen=True)
class LayerPlan:
    stages: tuple[StagePlan, ...]
    """In the order the layers run; the first is the leader."""
    context: int
    layer_bytes: int
    """Memory one layer takes: its weights and its KV cache for `context` tokens."""

    @property
    def leader(self) -> Candidate:
        return self.stages[0].candidate

    def describe(self) -> str:
        return ", ".join(
            f"{s.candidate.name} layers {s.first_layer}-{s.last_layer}" for s in self.stages
        )

    def lenders(self) -> list[tuple[str, int]]:
        """The stages after the leader's: each one's RPC endpoint and how many layers it holds."""
        return [(_rpc_endpoint(stage.candidate), stage.layers) for stage in self.stages[1:]]

    def peers_at(self, endpoints: Iterable[str]) -> set[str]:
        """The lending peers whose RPC servers are at `endpoints` (the leader's lost stages)."""
        by_endpoint = {_rpc_endpoint(s.candidate): s.candidate.name for s in self.stages[1:]}
        return {by_endpoint[e] for e in endpoints if e in by_endpoint}


@dataclass(frozen=True)
class CannotSplit:
    message: str


def place(
    request: InferenceRequestSpec,
    candidates: Sequence[Candidate],
    profile: Profile,
    prompt_tokens: int,
    excluded: frozenset[str] = frozenset(),
) -> Decision | LayerPlan | Unschedulable | CannotSplit:
    """One peer when one can take the request; when peers hold the model but none has the
    memory for it, a split of its layers across peers; otherwise why neither."""
    single = schedule(request, candidates, profile, excluded)
    if isinstance(single, Decision) or not single.memory_short:
        return single
    split = plan_layer_split(request, candidates, prompt_tokens, excluded)
    if isinstance(split, CannotSplit):
        return CannotSplit(f"{single.message}; {split.message}")
    return split


def leading(placed: Decision | LayerPlan) -> tuple[Decision, LayerPlan | None]:
    """Where a placed request is sent: the peer chosen, or a split's leader with its plan."""
    if isinstance(placed, Decision):
        return placed, None
    return Decision(placed.leader, 0.0), placed


def split_context(prompt_tokens: int, max_tokens: int, model_context: int | None = None) -> int:
    """The context a split is loaded with: the request's, rounded up to a power of two (so
    that requests of similar sizes share one loaded plan), within the model's own."""
    wanted = max(MIN_CONTEXT, 1 << math.ceil(math.log2(max(prompt_tokens + max_tokens, 1))))
    return min(wanted, model_context) if model_context else wanted


def layer_bytes(model: LocalModel, context: int) -> int | None:
    """A layer's weights and KV for `context` tokens; None when the model's shape is unknown.
    Embeddings and the output head are spread over the layers: they are a few percent."""
    if model.size_bytes is None or model.layers is None:
        return None
    kv = (model.kv_bytes_per_token or 0) * context
    return math.ceil((model.size_bytes + kv) / model.layers)


def plan_layer_split(
    request: InferenceRequestSpec,
    candidates: Sequence[Candidate],
    prompt_tokens: int,
    excluded: frozenset[str] = frozenset(),
) -> LayerPlan | CannotSplit:
    eligible = [
        c
        for c in candidates
        if c.name not in excluded and not any(f.reason(request, c) for f in SHARED_FILTERS)
    ]
    leaders = sorted(
        ((c, model) for c in eligible if (model := _model_to_lead(request, c))),
        key=lambda pair: (-peer_memory(pair[0].peer.spec), pair[0].name),
    )
    if not leaders:
        return CannotSplit(
            f"no Ready llama.cpp peer that decodes holds the weights of {request.model!r},"
            " with their size and layer count, to lead a split"
        )
    lenders = [c for c in eligible if c.peer.spec.rpc_server and "llamacpp" in c.peer.spec.backends]
    context = split_context(prompt_tokens, request.sampling.max_tokens)
    shortest: tuple[int, int, int, int] | None = None  # layers missing, held, needed, offered
    for leader, (layers, per_layer) in ((c, _shape(m, context)) for c, m in leaders):
        if _capacity(leader, per_layer) < 1:
            continue
        chosen = _gather(leader, [c for c in lenders if c is not leader], per_layer, layers)
        held = sum(_capacity(c, per_layer) for c in chosen)
        if held >= layers:
            return LayerPlan(_assign(chosen, per_layer, layers), context, per_layer)
        offered = int(sum(peer_memory(c.peer.spec) for c in chosen))
        attempt = (layers - held, held, layers * per_layer, offered)
        shortest = attempt if shortest is None else min(shortest, attempt)
    if shortest is None:
        return CannotSplit(
            f"no peer that holds {request.model!r} has the memory for even one of its layers"
        )
    missing, held, needed, offered = shortest
    return CannotSplit(
        f"the federation cannot hold {request.model!r}: it needs {_gib(needed)} for its weights"
        f" and the KV cache of {context} tokens; the {len(leaders)} peer(s) that can lead and"
        f" {len(lenders)} that lend layers (rpcServer) offer {_gib(offered)}, room for {held}"
        f" layers, {missing} short"
    )


def _model_to_lead(request: InferenceRequestSpec, candidate: Candidate) -> LocalModel | None:
    """The GGUF the candidate holds, if it can lead: the model's shape is known, and it runs
    llama.cpp and decodes (the leader samples)."""
    model = next((m for m in candidate.peer.spec.models if m.name == request.model), None)
    if (
        model is None
        or model.format != "gguf"
        or layer_bytes(model, 0) is None
        or "llamacpp" not in candidate.peer.spec.backends
        or Decodes().reason(request, candidate)
    ):
        return None
    return model


def _shape(model: LocalModel, context: int) -> tuple[int, int]:
    """Layers, and bytes per layer; for models `_model_to_lead` accepted."""
    per_layer = layer_bytes(model, context)
    assert model.layers is not None
    assert per_layer is not None
    return model.layers, per_layer


def _capacity(candidate: Candidate, per_layer: int) -> int:
    return int(peer_memory(candidate.peer.spec) // per_layer)


def _gather(
    leader: Candidate, lenders: list[Candidate], per_layer: int, layers: int
) -> list[Candidate]:
    """The leader, then lenders nearest it and largest first, until they hold every layer."""
    spec = leader.peer.spec

    def nearness(c: Candidate) -> tuple[bool, bool, float, str]:
        other = c.peer.spec
        return (
            other.network.region != spec.network.region,
            other.cluster != spec.cluster,
            -peer_memory(other),
            c.name,
        )

    chosen = [leader]
    held = _capacity(leader, per_layer)
    for lender in sorted(lenders, key=nearness):
        if held >= layers:
            break
        if (room := _capacity(lender, per_layer)) > 0:
            chosen.append(lender)
            held += room
    return chosen


def _assign(chosen: list[Candidate], per_layer: int, layers: int) -> tuple[StagePlan, ...]:
    """Whole layers in proportion to cores, none past a peer's memory (water-filling, then
    the largest remainders); a peer left with no layer is left out."""
    capacity = [_capacity(c, per_layer) for c in chosen]
    speed = [max(quantity_value(c.peer.spec.resources.cpu), 0.001) for c in chosen]
    share = [0.0] * len(chosen)
    open_ = set(range(len(chosen)))
    remaining = float(layers)
    while open_:
        total = sum(speed[i] for i in open_)
        full = {i for i in open_ if remaining * speed[i] / total >= capacity[i]}
        if not full:
            for i in open_:
                share[i] = remaining * speed[i] / total
            break
        for i in full:
            share[i] = capacity[i]
            remaining -= capacity[i]
        open_ -= full
    counts = [min(int(s), capacity[i]) for i, s in enumerate(share)]
    counts[0] = max(counts[0], 1)  # the leader runs the first layers after the embeddings
    by_remainder = sorted(range(len(chosen)), key=lambda i: (counts[i] - share[i], i))
    for i in by_remainder:
        if sum(counts) >= layers:
            break
        if counts[i] < capacity[i]:
            counts[i] += 1
    while sum(counts) > layers:  # only when the leader's one layer was more than its share
        counts[max(range(1, len(counts)), key=lambda i: counts[i])] -= 1
    stages, first = [], 0
    for candidate, count in zip(chosen, counts, strict=True):
        if count:
            stages.append(StagePlan(candidate, first, first + count - 1))
            first += count
    return tuple(stages)


def _rpc_endpoint(candidate: Candidate) -> str:
    server = candidate.peer.spec.rpc_server
    assert server is not None  # only peers with one lend layers
    return server.endpoint


def _gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB"
