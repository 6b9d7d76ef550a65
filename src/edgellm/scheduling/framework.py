"""The scheduling framework: the plugin roles, a profile that combines them, and `schedule`.

`schedule` is a pure function of its inputs (the request, snapshots of the peers, a profile), so
the operator and the router call the same code and tests need no cluster. Each plugin's latency
is recorded (`Decision.plugin_seconds`, which the operator and the router export as a histogram
by plugin), because routing overhead must stay visible. A scorer's score counts within [0, 1],
whatever it returns, so that the weights alone say what matters most.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from edgellm.api import InferenceRequestSpec, PeerNode


@dataclass(frozen=True)
class Candidate:
    """A peer as the scheduler sees it: the resource, plus what only the caller knows."""

    peer: PeerNode
    local: bool  # in the scheduling cluster, not a mirror
    session_warm: bool = False  # served the request's session lately: its KV is still there
    cached_fraction: float = 0.0  # share of the prompt's KV blocks the peer holds (KV events)
    in_flight: int = 0  # requests the caller itself has running there now

    @property
    def name(self) -> str:
        return self.peer.metadata.name


PLUGIN_BUCKETS = (1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05)
"""Seconds one plugin takes over every candidate: microseconds for a few peers, milliseconds
for a thousand; the histogram buckets of the operator's and the router's plugin timings."""


class MemoryShortfall(str):
    """A filter's reason that the peer's memory cannot hold the model: the one refusal that a
    split of the model's layers across peers can overcome (`layersplit.place`)."""


@runtime_checkable  # so a profile written as configuration can be checked
class Filter(Protocol):
    @property
    def name(self) -> str: ...

    def reason(self, request: InferenceRequestSpec, candidate: Candidate) -> str | None:
        """Why the candidate cannot serve the request, or None when it can; a
        `MemoryShortfall` when only its memory is too small."""


@runtime_checkable
class Scorer(Protocol):
    @property
    def name(self) -> str: ...

    def score(self, request: InferenceRequestSpec, candidate: Candidate) -> float:
        """How well the candidate suits the request, in [0, 1]."""


@runtime_checkable
class Picker(Protocol):
    @property
    def name(self) -> str: ...

    def pick(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate: ...


@dataclass(frozen=True)
class WeightedScorer:
    """Weights live outside the scorers, so a profile can tune them without new code."""

    scorer: Scorer
    weight: float


@dataclass(frozen=True)
class Profile:
    filters: Sequence[Filter]
    scorers: Sequence[WeightedScorer]
    picker: Picker


@dataclass(frozen=True)
class Decision:
    peer: Candidate
    score: float
    plugin_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Unschedulable:
    """No peer can serve the request; `reasons` says why, per reason, how many peers."""

    reasons: dict[str, int]

    @property
    def memory_short(self) -> bool:
        """Whether some peers were refused only for want of memory for the model."""
        return any(isinstance(why, MemoryShortfall) for why in self.reasons)

    @property
    def message(self) -> str:
        if not self.reasons:
            return "no peer is known in this federation"
        return "; ".join(f"{count} peer(s): {why}" for why, count in sorted(self.reasons.items()))


def schedule(
    request: InferenceRequestSpec,
    candidates: Sequence[Candidate],
    profile: Profile,
    excluded: frozenset[str] = frozenset(),
) -> Decision | Unschedulable:
    timings: dict[str, float] = {}
    reasons: dict[str, int] = {}
    feasible = [c for c in candidates if c.name not in excluded]
    if len(feasible) < len(candidates):
        reasons["failed during this request"] = len(candidates) - len(feasible)
    # Plugin by plugin over every candidate, not candidate by candidate: one clock reading per
    # plugin, where two per plugin and candidate cost more than the plugins with 1,000 peers.
    for plugin in profile.filters:
        started = time.perf_counter()
        kept = []
        for candidate in feasible:
            why = plugin.reason(request, candidate)
            if why:
                reasons[why] = reasons.get(why, 0) + 1
            else:
                kept.append(candidate)
        feasible = kept
        timings[plugin.name] = timings.get(plugin.name, 0.0) + time.perf_counter() - started
    if not feasible:
        return Unschedulable(reasons)
    totals = [0.0] * len(feasible)
    for weighted in profile.scorers:
        started = time.perf_counter()
        score, weight = weighted.scorer.score, weighted.weight
        for index, candidate in enumerate(feasible):
            totals[index] += weight * min(max(score(request, candidate), 0.0), 1.0)
        name = weighted.scorer.name
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - started
    scored = list(zip(feasible, totals, strict=True))
    chosen = profile.picker.pick(scored)
    return Decision(chosen, next(score for c, score in scored if c is chosen), timings)
