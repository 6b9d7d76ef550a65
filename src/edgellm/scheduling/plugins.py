"""EdgeLLM's scheduling plugins, each small enough to read at a glance, and the default profile.

`registry()` returns a fresh name -> factory map (nothing registers itself at import time);
`default_profile()` is the profile the operator uses unless configured otherwise.
"""

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field

from edgellm.api import (
    TRUST_ORDER,
    InferenceRequestSpec,
    PeerNodeSpec,
    condition_status,
    quantity_value,
)
from edgellm.scheduling.framework import (
    Candidate,
    Filter,
    MemoryShortfall,
    Picker,
    Profile,
    Scorer,
    WeightedScorer,
)


def peer_memory(spec: PeerNodeSpec) -> float:
    """Bytes the peer gives to workers: its memory and its accelerators'."""
    return quantity_value(spec.resources.memory) + sum(
        quantity_value(a.memory) * a.count for a in spec.resources.accelerators
    )


@dataclass(frozen=True)
class HasModel:
    name: str = "has-model"

    def reason(self, request: InferenceRequestSpec, candidate: Candidate) -> str | None:
        held = {m.name for m in candidate.peer.spec.models}
        return None if request.model in held else f"does not hold model {request.model!r}"


@dataclass(frozen=True)
class Decodes:
    name: str = "decodes"

    def reason(self, request: InferenceRequestSpec, candidate: Candidate) -> str | None:
        return None if "decode" in candidate.peer.spec.roles else "does not decode"


@dataclass(frozen=True)
class Healthy:
    name: str = "healthy"

    def reason(self, request: InferenceRequestSpec, candidate: Candidate) -> str | None:
        conditions = candidate.peer.status.conditions
        if candidate.peer.spec.unschedulable:
            return "is draining"
        if condition_status(conditions, "Reachable") == "False":
            return "is unreachable"
        if condition_status(conditions, "Ready") != "True":
            return "is not Ready"
        return None


@dataclass(frozen=True)
class HasRoom:
    """Capacity: the peer's memory holds the model, and its queue is not full."""

    name: str = "has-room"
    max_queued: int = 16

    def reason(self, request: InferenceRequestSpec, candidate: Candidate) -> str | None:
        spec, load = candidate.peer.spec, candidate.peer.status.load
        if load.queued_requests >= self.max_queued:
            return f"has {load.queued_requests} requests queued"
        size = next((m.size_bytes for m in spec.models if m.name == request.model), None)
        memory = peer_memory(spec)
        if size is not None and size > memory:
            why = f"cannot hold {size / 2**30:.1f} GiB of weights in {memory / 2**30:.1f} GiB"
            return MemoryShortfall(why)
        return None


@dataclass(frozen=True)
class Trusted:
    name: str = "trusted"

    def reason(self, request: InferenceRequestSpec, candidate: Candidate) -> str | None:
        wanted = request.placement.min_trust
        if TRUST_ORDER[candidate.peer.spec.trust_level] < TRUST_ORDER[wanted]:
            return f"is trusted less than {wanted}"
        return None


@dataclass(frozen=True)
class InClusters:
    name: str = "in-clusters"

    def reason(self, request: InferenceRequestSpec, candidate: Candidate) -> str | None:
        allowed = request.placement.clusters
        if allowed and candidate.peer.spec.cluster not in allowed:
            return "is outside placement.clusters"
        return None


@dataclass(frozen=True)
class MatchesSelector:
    name: str = "matches-selector"

    def reason(self, request: InferenceRequestSpec, candidate: Candidate) -> str | None:
        selector = request.placement.peer_selector
        if selector is None:
            return None
        labels = candidate.peer.metadata.labels
        if any(labels.get(k) != v for k, v in selector.match_labels.items()):
            return "does not match placement.peerSelector"
        for requirement in selector.match_expressions:
            value = labels.get(requirement.key)
            holds = {
                "In": value in requirement.values,
                "NotIn": value not in requirement.values,
                "Exists": value is not None,
                "DoesNotExist": value is None,
            }[requirement.operator]
            if not holds:
                return "does not match placement.peerSelector"
        return None


@dataclass(frozen=True)
class LeastLoaded:
    """Prefers idle peers: 1 with nothing running or queued, towards 0 as work piles up."""

    name: str = "least-loaded"

    def score(self, request: InferenceRequestSpec, candidate: Candidate) -> float:
        load = candidate.peer.status.load
        # Heartbeats sample the load every few seconds; what the caller itself sent since counts
        # at once, so a burst spreads over the peers instead of piling on the first.
        busy = max(load.running_requests + load.queued_requests, candidate.in_flight)
        return 1.0 / (1.0 + busy)


@dataclass(frozen=True)
class KVCacheRoom:
    """Prefers peers whose KV cache has room, so long prompts are not evicted mid-flight."""

    name: str = "kv-cache-room"

    def score(self, request: InferenceRequestSpec, candidate: Candidate) -> float:
        return 1.0 - candidate.peer.status.load.kv_cache_usage


@dataclass(frozen=True)
class PrefixCacheOverlap:
    """Prefers the peer that holds most of the prompt's KV: what it holds is not recomputed."""

    name: str = "prefix-cache-overlap"

    def score(self, request: InferenceRequestSpec, candidate: Candidate) -> float:
        return candidate.cached_fraction


@dataclass(frozen=True)
class SessionAffinity:
    """Keeps a session on the peer that holds its KV, unless that peer is filtered out."""

    name: str = "session-affinity"

    def score(self, request: InferenceRequestSpec, candidate: Candidate) -> float:
        return 1.0 if candidate.session_warm else 0.0


@dataclass(frozen=True)
class Local:
    """Prefers this cluster's own peers when scores are otherwise close."""

    name: str = "local"

    def score(self, request: InferenceRequestSpec, candidate: Candidate) -> float:
        return 1.0 if candidate.local else 0.0


@dataclass(frozen=True)
class MaxScore:
    """The highest score wins; ties go to the name first in order, so decisions repeat."""

    name: str = "max-score"

    def pick(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        return min(scored, key=lambda pair: (-pair[1], pair[0].name))[0]


@dataclass(frozen=True)
class RoundRobin:
    """Each feasible peer in turn, whatever the scores: the baseline KV-aware routing must beat."""

    name: str = "round-robin"
    _turns: Iterator[int] = field(default_factory=itertools.count, compare=False, repr=False)

    def pick(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        ordered = sorted((candidate for candidate, _ in scored), key=lambda c: c.name)
        return ordered[next(self._turns) % len(ordered)]


def registry() -> dict[str, Callable[[], Filter | Scorer | Picker]]:
    """Every plugin by name, for profiles written as configuration."""
    plugins: list[Callable[[], Filter | Scorer | Picker]] = [
        HasModel,
        HasRoom,
        Decodes,
        Healthy,
        Trusted,
        InClusters,
        MatchesSelector,
        LeastLoaded,
        KVCacheRoom,
        PrefixCacheOverlap,
        SessionAffinity,
        Local,
        MaxScore,
        RoundRobin,
    ]
    return {factory().name: factory for factory in plugins}


def default_profile() -> Profile:
    scorers: list[tuple[Scorer, float]] = [
        (LeastLoaded(), 2.0),
        (KVCacheRoom(), 1.0),
        (PrefixCacheOverlap(), 4.0),  # a cached prompt outweighs a busier, fuller peer
        (SessionAffinity(), 4.0),  # more than all the others: a warm KV beats an idle peer
        (Local(), 0.5),
    ]
    picker: Picker = MaxScore()
    return Profile(
        filters=[
            Healthy(),
            HasModel(),
            HasRoom(),
            Decodes(),
            Trusted(),
            InClusters(),
            MatchesSelector(),
        ],
        scorers=[WeightedScorer(scorer, weight) for scorer, weight in scorers],
        picker=picker,
    )


class ProfileConfig(BaseModel):
    """A profile as configuration (`edgellm operator --scheduler-profile FILE`, YAML): plugin
    names from `registry()`; what is left out keeps the default profile's."""

    model_config = ConfigDict(extra="forbid")

    filters: list[str] | None = None
    scorers: dict[str, float] | None = Field(default=None)
    """Scorer name -> weight (>= 0)."""
    picker: str | None = None
    parameters: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Plugin name -> its parameters, such as `has-room: {max_queued: 8}`."""


def configured_profile(config: ProfileConfig) -> Profile:
    """The default profile with the configured parts and plugin parameters; ValueError names
    an unknown plugin or parameter."""
    plugins = registry()
    if unknown := sorted(config.parameters.keys() - plugins.keys()):
        raise ValueError(f"parameters for unknown plugins: {', '.join(unknown)}")

    def plugin(name: str, role: type[Any]) -> Any:
        factory = plugins.get(name)
        if factory is None or not isinstance(factory(), role):
            known = sorted(n for n, f in plugins.items() if isinstance(f(), role))
            raise ValueError(
                f"{name!r} is not a {role.__name__.lower()}; known: {', '.join(known)}"
            )
        return _configured(name, factory, config.parameters.get(name, {}))

    filters = [plugin(f.name, Filter) for f in default_profile().filters]
    if config.filters is not None:
        filters = [plugin(name, Filter) for name in config.filters]
    weights = {w.scorer.name: w.weight for w in default_profile().scorers}
    if config.scorers is not None:
        for name, weight in config.scorers.items():
            if weight < 0:
                raise ValueError(f"the weight of {name!r} is negative")
        weights = config.scorers
    scorers = [WeightedScorer(plugin(n, Scorer), w) for n, w in weights.items()]
    picker = plugin(config.picker or default_profile().picker.name, Picker)
    return Profile(filters=filters, scorers=scorers, picker=picker)


def _configured(
    name: str, factory: Callable[..., Filter | Scorer | Picker], parameters: dict[str, Any]
) -> Filter | Scorer | Picker:
    """The plugin made with `parameters`, which must be fields of its dataclass (not its
    name, which the registry gives it)."""
    accepted = {
        f.name
        for f in fields(cast(Any, factory))
        if f.init and f.name != "name" and not f.name.startswith("_")
    }
    if unknown := sorted(parameters.keys() - accepted):
        known = ", ".join(sorted(accepted)) or "none"
        raise ValueError(f"{name!r} has no parameter {', '.join(unknown)}; it takes: {known}")
    return factory(**parameters)
