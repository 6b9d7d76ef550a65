"""The federation as this router sees it, for people: the status page's data and its JSON API
(`GET /v1/federation`).

`federation_status` is pure: it reads what the router already keeps (its `PeerDirectory`, the
KV index, the `RequestLog` of its requests, the `Prober`'s answers) plus the FederationMembers
of its cluster, and returns one `FederationStatus`, with one page of the peers that match a
`PeerQuery`, problems first. `statuspage.py` serves it as HTML and as JSON; `Members` lists the
FederationMembers at most once per refresh interval, and only while someone looks.

What it cannot know it leaves empty rather than guess: the models a worker serves when the
prober has not reached it, link figures nobody measured, splits and requests other routers or
the operators placed (`kubectl get ir` lists those).
"""

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from kubernetes import client
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from edgellm.api import Condition, FederationMember, PeerNode
from edgellm.kube import objects
from edgellm.kvcache.events import MEDIUM_CPU, MEDIUM_GPU, MEDIUM_IPFS
from edgellm.kvcache.index import KVIndex
from edgellm.router.peers import PeerDirectory, why
from edgellm.router.probes import Probe
from edgellm.router.requestlog import RequestLog, RequestOutcome

logger = logging.getLogger(__name__)

PeerState = Literal["unreachable", "not-ready", "failing", "draining", "ready"]
"""Worst first, the order the page lists peers in. `failing`: Ready, but a request just failed
on it here, and the router leaves it out for its cooldown."""
PEER_STATES: tuple[PeerState, ...] = ("unreachable", "not-ready", "failing", "draining", "ready")
MAX_PER_PAGE = 1000


class _Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class PeerQuery(BaseModel):
    """Which peers one page shows (the page's and the API's query parameters)."""

    state: PeerState | None = None
    q: str = Field(default="", max_length=200)
    """A part of the peer's name, cluster or a model it holds."""
    page: int = Field(default=1, ge=1)
    per_page: int = Field(default=50, ge=1, le=MAX_PER_PAGE)


class KVBlocks(_Out):
    gpu: int = 0
    cpu: int = 0
    ipfs: int = 0

    @classmethod
    def of(cls, counts: Mapping[str, int]) -> "KVBlocks":
        return cls(
            gpu=counts.get(MEDIUM_GPU, 0),
            cpu=counts.get(MEDIUM_CPU, 0),
            ipfs=counts.get(MEDIUM_IPFS, 0),
        )


class MemberView(_Out):
    name: str
    this_cluster: bool = False
    reachable: bool | None
    """None until the operator has probed the member."""
    since: datetime | None
    reason: str = ""
    peers: int
    """Peers of that cluster this router knows (its own, or their mirrors here)."""
    mirrored_peers: int | None = None
    """This cluster's peers mirrored there."""
    last_sync: datetime | None = None
    sync_lag_seconds: float | None = None
    """Since the operator last recorded a successful sync there: it refreshes the record at
    least every 30 s while nothing changes."""


class Link(_Out):
    region: str
    uplink_mbps: float
    downlink_mbps: float
    path: str | None = None
    """How the router reaches the worker, once it has: direct."""
    rtt_ms: float | None = None
    """The router's last round trip to the worker's API."""


class LentLayers(_Out):
    model: str
    first_layer: int
    last_layer: int
    leads: bool


class PeerView(_Out):
    name: str
    cluster: str
    state: PeerState
    reason: str
    backends: list[str]
    models_held: list[str]
    models_loaded: list[str] | None
    """None while the prober has no answer from its worker."""
    layers: list[LentLayers]
    running: int
    queued: int
    tokens_per_second: float
    routed_in_flight: int
    """Requests this router has running there."""
    kv_cache_usage: float
    kv_blocks: KVBlocks
    link: Link
    last_heartbeat: datetime | None
    heartbeat_age_seconds: float | None


class PeerPage(_Out):
    total: int
    """Peers that match the query."""
    page: int
    pages: int
    per_page: int
    items: list[PeerView]


class ModelView(_Out):
    name: str
    clusters: dict[str, int]
    """Where it is served: Ready peers holding it, by cluster."""
    replicas: int
    loaded: int
    """Peers whose worker says it serves the model."""
    in_flight: int
    tokens_per_second: float
    """Generated through this router, over the last minute."""
    cache_hit_rate: float | None
    """Cached prompt tokens over prompt tokens, of this router's requests since it started."""
    kv_blocks: KVBlocks


class StageView(_Out):
    peer: str
    first_layer: int
    last_layer: int


class SplitView(_Out):
    model: str
    leader: str
    context: int
    stages: list[StageView]
    last_used: datetime


class RequestView(_Out):
    id: str
    model: str
    started: datetime
    peer: str | None
    prefill_peer: str | None
    stages: list[str]
    outcome: RequestOutcome
    detail: str
    attempts: int
    ttft_seconds: float | None
    seconds: float | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class ClusterLoss(_Out):
    message: str
    last_listed: datetime | None


class FederationStatus(_Out):
    generated_at: datetime
    cluster: str | None
    cluster_error: ClusterLoss | None
    members: list[MemberView]
    peer_states: dict[PeerState, int]
    """Every peer's state, counted, whatever the query."""
    peers: PeerPage
    models: list[ModelView]
    splits: list[SplitView]
    requests: list[RequestView]
    """The most recent first."""


class Members:
    """This cluster's FederationMembers, listed at most every `refresh` seconds, when asked."""

    def __init__(self, api: client.ApiClient | None, refresh: float) -> None:
        self._api = api
        self.refresh = refresh
        self.members: list[FederationMember] = []
        self.error: str | None = None
        self._listed = -math.inf
        self._lock = asyncio.Lock()

    async def current(self) -> list[FederationMember]:
        if self._api is None:
            return []
        async with self._lock:
            now = asyncio.get_running_loop().time()
            if now - self._listed >= self.refresh:
                self._listed = now
                try:
                    bodies = await asyncio.to_thread(
                        objects.list_objects, self._api, objects.FEDERATION_MEMBERS, timeout=5
                    )
                except Exception as e:  # the cluster is away: keep the last members known
                    self.error = why(e)
                else:
                    self.error = None
                    self.members = _valid_members(bodies)
        return self.members


def _valid_members(bodies: list[dict[str, Any]]) -> list[FederationMember]:
    members = []
    for body in bodies:
        try:
            members.append(FederationMember.model_validate(body))
        except ValidationError as e:
            logger.info("FederationMember %s is not valid: %s", body["metadata"]["name"], e)
    return members


@dataclass(frozen=True)
class Sources:
    """What the router keeps that the status is made of."""

    cluster: str | None
    peers: PeerDirectory
    index: KVIndex
    requests: RequestLog
    probes: Mapping[str, Probe]


@dataclass(frozen=True)
class _Judged:
    """A peer and its state: what counting, filtering and sorting every peer needs; only the
    page shown becomes `PeerView`s."""

    peer: PeerNode
    state: PeerState
    reason: str
    held: list[str]


def federation_status(
    sources: Sources,
    members: list[FederationMember],
    members_error: str | None,
    query: PeerQuery,
    now: datetime,
) -> FederationStatus:
    peers = sources.peers
    failing = peers.failing()
    judged = [
        _Judged(
            peer,
            *peer_state(peer, name in failing, sources.probes.get(name)),
            [m.name for m in peer.spec.models],
        )
        for name, peer in peers.peers.items()
    ]
    states = {state: 0 for state in PEER_STATES}
    for one in judged:
        states[one.state] += 1
    return FederationStatus(
        generated_at=now,
        cluster=sources.cluster,
        cluster_error=_cluster_loss(peers, members_error),
        members=_members(sources, members, now),
        peer_states=states,
        peers=_page(judged, query, sources, now),
        models=_models(judged, sources, now),
        splits=[
            SplitView(
                model=model,
                leader=split.plan.leader.name,
                context=split.plan.context,
                stages=[
                    StageView(
                        peer=s.candidate.name, first_layer=s.first_layer, last_layer=s.last_layer
                    )
                    for s in split.plan.stages
                ],
                last_used=split.last_used,
            )
            for model, split in sorted(sources.requests.splits.items())
        ],
        requests=[
            RequestView(
                id=r.id,
                model=r.model,
                started=r.started,
                peer=r.peer,
                prefill_peer=r.prefill_peer,
                stages=list(r.stages),
                outcome=r.outcome,
                detail=r.detail,
                attempts=r.attempts,
                ttft_seconds=r.ttft_seconds,
                seconds=r.seconds,
                prompt_tokens=r.prompt_tokens,
                completion_tokens=r.completion_tokens,
                cached_tokens=r.cached_tokens,
            )
            for r in reversed(sources.requests.recent)
        ],
    )


def _cluster_loss(peers: PeerDirectory, members_error: str | None) -> ClusterLoss | None:
    error = peers.list_error or members_error
    return None if error is None else ClusterLoss(message=error, last_listed=peers.listed)


def _condition(peer: PeerNode, type_: str) -> Condition | None:
    return next((c for c in peer.status.conditions if c.type == type_), None)


def peer_state(peer: PeerNode, failing: bool, probe: Probe | None) -> tuple[PeerState, str]:
    """The peer's state and why, from its conditions, then what only the router saw."""
    reachable, draining = _condition(peer, "Reachable"), _condition(peer, "Draining")
    ready = _condition(peer, "Ready")
    if reachable is not None and reachable.status == "False":
        return "unreachable", _because(reachable)
    if probe is not None and probe.error is not None:
        return "unreachable", f"RouterProbeFailed: {probe.error}"
    if draining is not None and draining.status == "True":
        return "draining", _because(draining)
    if ready is None or ready.status != "True":
        return "not-ready", _because(ready) if ready else "the operator has not assessed it yet"
    if failing:
        return "failing", "a request failed there: the router leaves it out for a while"
    return "ready", _because(ready)


def _because(condition: Condition) -> str:
    return f"{condition.reason}: {condition.message}" if condition.message else condition.reason


def _peer_view(one: _Judged, sources: Sources, layers: list[LentLayers], now: datetime) -> PeerView:
    peer = one.peer
    name, spec, status = peer.metadata.name, peer.spec, peer.status
    probe = sources.probes.get(name)
    beat = status.last_heartbeat_time
    reached = probe is not None and probe.rtt_ms is not None
    return PeerView(
        name=name,
        cluster=spec.cluster,
        state=one.state,
        reason=one.reason,
        backends=list(spec.backends),
        models_held=one.held,
        models_loaded=_loaded(probe),
        layers=layers,
        running=status.load.running_requests,
        queued=status.load.queued_requests,
        tokens_per_second=status.load.tokens_per_second,
        routed_in_flight=sources.peers.in_flight[name],
        kv_cache_usage=status.load.kv_cache_usage,
        kv_blocks=KVBlocks.of(sources.index.blocks_by_medium(name)),
        link=Link(
            region=spec.network.region,
            uplink_mbps=spec.network.uplink_mbps,
            downlink_mbps=spec.network.downlink_mbps,
            path="direct" if reached else None,
            rtt_ms=probe.rtt_ms if probe else None,
        ),
        last_heartbeat=beat,
        heartbeat_age_seconds=(now - beat).total_seconds() if beat else None,
    )


def _lent_layers(requests: RequestLog) -> dict[str, list[LentLayers]]:
    lent: dict[str, list[LentLayers]] = {}
    for model, split in requests.splits.items():
        for number, stage in enumerate(split.plan.stages):
            lent.setdefault(stage.candidate.name, []).append(
                LentLayers(
                    model=model,
                    first_layer=stage.first_layer,
                    last_layer=stage.last_layer,
                    leads=number == 0,
                )
            )
    return lent


def _matches(one: _Judged, query: PeerQuery) -> bool:
    if query.state is not None and one.state != query.state:
        return False
    text = query.q.strip().lower()
    spec = one.peer.spec
    names = (one.peer.metadata.name, spec.cluster, *one.held)
    return not text or any(text in name.lower() for name in names)


def _page(judged: list[_Judged], query: PeerQuery, sources: Sources, now: datetime) -> PeerPage:
    rank = {state: number for number, state in enumerate(PEER_STATES)}
    matching = sorted(
        (one for one in judged if _matches(one, query)),
        key=lambda one: (rank[one.state], one.peer.spec.cluster, one.peer.metadata.name),
    )
    pages = max(1, math.ceil(len(matching) / query.per_page))
    page = min(query.page, pages)
    start = (page - 1) * query.per_page
    lent = _lent_layers(sources.requests)
    return PeerPage(
        total=len(matching),
        page=page,
        pages=pages,
        per_page=query.per_page,
        items=[
            _peer_view(one, sources, lent.get(one.peer.metadata.name, []), now)
            for one in matching[start : start + query.per_page]
        ],
    )


def _members(sources: Sources, members: list[FederationMember], now: datetime) -> list[MemberView]:
    counts: dict[str, int] = {}
    for peer in sources.peers.peers.values():
        counts[peer.spec.cluster] = counts.get(peer.spec.cluster, 0) + 1
    views = []
    if sources.cluster is not None:
        peers = sources.peers
        views.append(
            MemberView(
                name=sources.cluster,
                this_cluster=True,
                reachable=peers.list_error is None if peers.listed else None,
                since=None,
                reason=peers.list_error or "",
                peers=counts.get(sources.cluster, 0),
            )
        )
    for member in sorted(members, key=lambda m: m.metadata.name):
        status = member.status
        reachable = next((c for c in status.conditions if c.type == "Reachable"), None)
        synced = next((c for c in status.conditions if c.type == "Synced"), None)
        last_sync = status.last_probe_time if synced and synced.status == "True" else None
        views.append(
            MemberView(
                name=member.metadata.name,
                reachable=None if reachable is None else reachable.status == "True",
                since=reachable.last_transition_time if reachable else None,
                reason=_because(reachable) if reachable and reachable.status != "True" else "",
                peers=counts.get(member.metadata.name, 0),
                mirrored_peers=status.mirrored_peers,
                last_sync=last_sync,
                sync_lag_seconds=(now - last_sync).total_seconds() if last_sync else None,
            )
        )
    return views


def _models(judged: list[_Judged], sources: Sources, now: datetime) -> list[ModelView]:
    names = sorted({m for one in judged for m in one.held} | set(sources.requests.traffic))
    result = []
    for name in names:
        holders = [one for one in judged if name in one.held]
        clusters: dict[str, int] = {}
        for one in holders:
            if one.state == "ready":
                clusters[one.peer.spec.cluster] = clusters.get(one.peer.spec.cluster, 0) + 1
        loaded = [_loaded(sources.probes.get(one.peer.metadata.name)) for one in holders]
        blocks: Counter[str] = Counter()
        for one, models in zip(holders, loaded, strict=True):
            if _serves(one.held, models, name):
                blocks.update(sources.index.blocks_by_medium(one.peer.metadata.name))
        traffic = sources.requests.traffic.get(name)
        result.append(
            ModelView(
                name=name,
                clusters=clusters,
                replicas=sum(clusters.values()),
                loaded=sum(1 for models in loaded if models and name in models),
                in_flight=traffic.in_flight if traffic else 0,
                tokens_per_second=traffic.tokens_per_second(now.timestamp()) if traffic else 0.0,
                cache_hit_rate=traffic.hit_rate() if traffic else None,
                kv_blocks=KVBlocks.of(blocks),
            )
        )
    return result


def _loaded(probe: Probe | None) -> list[str] | None:
    return list(probe.models) if probe is not None and probe.models is not None else None


def _serves(held: list[str], loaded: list[str] | None, model: str) -> bool:
    """Whether the peer's KV blocks are the model's: its worker serves it, or, unprobed, it is
    the one model the peer holds (block hashes do not name their model)."""
    if loaded is not None:
        return model in loaded
    return held == [model]
