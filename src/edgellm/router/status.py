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
from edgellm.router.peers import PeerDirectory
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

    def __add__(self, other: "KVBlocks") -> "KVBlocks":
        return KVBlocks(
            gpu=self.gpu + other.gpu, cpu=self.cpu + other.cpu, ipfs=self.ipfs + other.ipfs
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
                    self.error = str(e) or type(e).__name__
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


def federation_status(
    sources: Sources,
    members: list[FederationMember],
    members_error: str | None,
    query: PeerQuery,
    now: datetime,
) -> FederationStatus:
    peers = sources.peers
    failing = peers.failing()
    lent = _lent_layers(sources.requests)
    views = [
        _peer_view(peer, sources, name in failing, lent.get(name, []), now)
        for name, peer in peers.peers.items()
    ]
    states = {state: 0 for state in PEER_STATES}
    for view in views:
        states[view.state] += 1
    return FederationStatus(
        generated_at=now,
        cluster=sources.cluster,
        cluster_error=_cluster_loss(peers, members_error),
        members=_members(sources, members, now),
        peer_states=states,
        peers=_page(views, query),
        models=_models(views, sources, now),
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


def _peer_view(
    peer: PeerNode, sources: Sources, failing: bool, layers: list[LentLayers], now: datetime
) -> PeerView:
    name, spec, status = peer.metadata.name, peer.spec, peer.status
    probe = sources.probes.get(name)
    state, reason = peer_state(peer, failing, probe)
    beat = status.last_heartbeat_time
    reached = probe is not None and probe.rtt_ms is not None
    return PeerView(
        name=name,
        cluster=spec.cluster,
        state=state,
        reason=reason,
        backends=list(spec.backends),
        models_held=[m.name for m in spec.models],
        models_loaded=list(probe.models) if probe and probe.models is not None else None,
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


def _matches(view: PeerView, query: PeerQuery) -> bool:
    if query.state is not None and view.state != query.state:
        return False
    text = query.q.strip().lower()
    return not text or any(text in s.lower() for s in (view.name, view.cluster, *view.models_held))


def _page(views: list[PeerView], query: PeerQuery) -> PeerPage:
    rank = {state: number for number, state in enumerate(PEER_STATES)}
    matching = sorted(
        (v for v in views if _matches(v, query)), key=lambda v: (rank[v.state], v.cluster, v.name)
    )
    pages = max(1, math.ceil(len(matching) / query.per_page))
    page = min(query.page, pages)
    start = (page - 1) * query.per_page
    return PeerPage(
        total=len(matching),
        page=page,
        pages=pages,
        per_page=query.per_page,
        items=matching[start : start + query.per_page],
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


def _models(views: list[PeerView], sources: Sources, now: datetime) -> list[ModelView]:
    names = sorted({m for v in views for m in v.models_held} | set(sources.requests.traffic))
    result = []
    for name in names:
        holders = [v for v in views if name in v.models_held]
        ready = [v for v in holders if v.state == "ready"]
        clusters: dict[str, int] = {}
        for view in ready:
            clusters[view.cluster] = clusters.get(view.cluster, 0) + 1
        serving = [v for v in holders if _serves(v, name)]
        traffic = sources.requests.traffic.get(name)
        result.append(
            ModelView(
                name=name,
                clusters=clusters,
                replicas=len(ready),
                loaded=sum(1 for v in holders if v.models_loaded and name in v.models_loaded),
                in_flight=traffic.in_flight if traffic else 0,
                tokens_per_second=traffic.tokens_per_second(now.timestamp()) if traffic else 0.0,
                cache_hit_rate=traffic.hit_rate() if traffic else None,
                kv_blocks=sum((v.kv_blocks for v in serving), KVBlocks()),
            )
        )
    return result


def _serves(view: PeerView, model: str) -> bool:
    """Whether the peer's KV blocks are the model's: its worker serves it, or, unprobed, it is
    the one model the peer holds (block hashes do not name their model)."""
    if view.models_loaded is not None:
        return model in view.models_loaded
    return view.models_held == [model]
