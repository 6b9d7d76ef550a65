"""The operator's view of the federation's peers, and the loop that judges their health.

`Runtime` feeds every PeerNode watch event to `PeerView.on_event` (this cluster's peers and the
mirrors of the other members' peers alike): the request runner schedules over that view, and
the KV-event subscriptions follow the peers that publish. While the operator leads, `health`
runs every `health_interval_seconds`: this cluster's own peers are assessed by
`peerhealth.assess` (Ready, Draining, removed after the grace), and the status of a mirror or a
peer written to the wrong cluster gets the condition that says so.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client
from pydantic import ValidationError

from edgellm.api import (
    ORIGIN_CLUSTER_LABEL,
    Condition,
    ConditionStatus,
    PeerModels,
    condition_status,
    set_condition,
)
from edgellm.kube import APIError, NotFoundError, objects
from edgellm.kvcache.index import KVIndex
from edgellm.kvcache.subscriptions import KVSubscriptions
from edgellm.operator import peerhealth
from edgellm.operator.events import EventRecorder
from edgellm.operator.metrics import OperatorMetrics
from edgellm.operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

Body = dict[str, Any]


def _now() -> datetime:
    return datetime.now(UTC)


class PeerView:
    """Every PeerNode this cluster holds, by name, as the watch last saw it."""

    def __init__(
        self,
        *,
        local: client.ApiClient,
        settings: OperatorSettings,
        events: EventRecorder,
        metrics: OperatorMetrics,
        on_own_change: Callable[[], None],
    ) -> None:
        """`on_own_change` is called when one of this cluster's own peers changes: its mirrors
        in the other members are then due."""
        self.local = local
        self.settings = settings
        self.events = events
        self.metrics = metrics
        self.on_own_change = on_own_change
        self.bodies: dict[str, Body] = {}
        self.models = PeerModels()
        self.kv_events = KVSubscriptions(KVIndex())

    def on_event(self, event_type: str | None, body: Body) -> None:
        name = body["metadata"]["name"]
        if event_type == "DELETED":
            self.bodies.pop(name, None)
            self.models.forget(name)
            self.kv_events.update(name, None)
        else:
            self.bodies[name] = body
            self.kv_events.update(name, body.get("spec"))
        if body.get("spec", {}).get("cluster") == self.settings.cluster:
            self.on_own_change()

    async def refresh(self) -> None:
        """Reads every peer anew: what changed while another replica led, or before a start."""
        listed = await asyncio.to_thread(objects.list_objects, self.local, objects.PEER_NODES)
        current = {p["metadata"]["name"]: p for p in listed}
        for name in self.bodies.keys() - current.keys():
            self.on_event("DELETED", self.bodies[name])
        for peer in current.values():
            self.on_event(None, peer)

    def own(self) -> list[Body]:
        return [p for p in self.bodies.values() if p["spec"]["cluster"] == self.settings.cluster]

    async def health(self) -> None:
        """Checks every peer each `health_interval_seconds`, for as long as it runs."""
        grace = timedelta(seconds=self.settings.peer_removal_grace_seconds)
        while True:
            now = _now()
            started = time.perf_counter()
            for body in list(self.bodies.values()):
                try:
                    await self._check(body, now, grace)
                except Exception:
                    logger.exception("checking peer %s failed", body["metadata"]["name"])
            self._count()
            seconds = time.perf_counter() - started
            self.metrics.reconcile_duration.labels(controller="peer-health").observe(seconds)
            await asyncio.sleep(self.settings.health_interval_seconds)

    async def mark_mirrors_unreachable(self, member: str, reason: str) -> None:
        for body in list(self.bodies.values()):
            if body["spec"]["cluster"] == member:
                await self._set_condition(
                    body, "Reachable", "False", "MemberUnreachable", f"{member}: {reason}"
                )

    async def _check(self, body: Body, now: datetime, grace: timedelta) -> None:
        name = body["metadata"]["name"]
        cluster = body["spec"]["cluster"]
        origin = body["metadata"].get("labels", {}).get(ORIGIN_CLUSTER_LABEL)
        if cluster != self.settings.cluster:
            if origin != cluster:  # neither ours nor a mirror: written to the wrong cluster
                await self._set_condition(
                    body,
                    "Ready",
                    "False",
                    "WrongCluster",
                    f"spec.cluster is {cluster!r} but this is {self.settings.cluster!r}",
                )
            return
        peer = self.models.get(body)
        if isinstance(peer, ValidationError):
            await self._set_condition(body, "Ready", "False", "InvalidSpec", str(peer)[:1000])
            return
        created = datetime.fromisoformat(body["metadata"]["creationTimestamp"])
        verdict = peerhealth.assess(peer, now, created, grace)
        for transition in verdict.transitions:
            await self._post_event(body, transition.type, transition.reason, transition.message)
        if verdict.remove:
            with contextlib.suppress(NotFoundError):
                await asyncio.to_thread(objects.delete, self.local, objects.PEER_NODES, name)
            return
        wire = [c.to_wire() for c in verdict.conditions]
        if (
            wire != [c.to_wire() for c in peer.status.conditions]
            or peer.status.observed_generation != peer.metadata.generation
        ):
            status = {"conditions": wire, "observedGeneration": peer.metadata.generation}
            await asyncio.to_thread(self._patch_status, name, status)

    async def _set_condition(
        self, body: Body, type_: str, status: ConditionStatus, reason: str, message: str
    ) -> None:
        """Sets one condition of a peer this operator does not assess (a mirror or a stray)."""
        peer = self.models.get(body)
        conditions = [] if isinstance(peer, ValidationError) else peer.status.conditions
        updated, changed = set_condition(conditions, type_, status, reason, message, _now())
        if changed:
            event_type = "Warning" if status == "False" else "Normal"
            await self._post_event(body, event_type, reason, message)
            wire = [c.to_wire() for c in updated]
            await asyncio.to_thread(
                self._patch_status, body["metadata"]["name"], {"conditions": wire}
            )

    async def _post_event(self, body: Body, type_: str, reason: str, message: str) -> None:
        await asyncio.to_thread(self.events.record, body, type_, reason, message)

    def _patch_status(self, name: str, status: Body) -> None:
        with contextlib.suppress(APIError):  # deleted meanwhile: nothing to report
            objects.patch_status(self.local, objects.PEER_NODES, name, status)

    def _count(self) -> None:
        """The peer metrics: by cluster and state, heartbeats, KV-cache use, accelerators."""
        counts: dict[tuple[str, str], int] = {}
        accelerators: dict[str, int] = {}
        self.metrics.heartbeat.clear()
        self.metrics.kv_cache_usage.clear()
        for body in self.bodies.values():
            peer = self.models.get(body)
            conditions = [] if isinstance(peer, ValidationError) else peer.status.conditions
            if not isinstance(peer, ValidationError):
                labels = {"cluster": peer.spec.cluster, "peer": body["metadata"]["name"]}
                if peer.status.last_heartbeat_time is not None:
                    beat = peer.status.last_heartbeat_time.timestamp()
                    self.metrics.heartbeat.labels(**labels).set(beat)
                self.metrics.kv_cache_usage.labels(**labels).set(peer.status.load.kv_cache_usage)
                if condition_status(conditions, "Ready") == "True":
                    devices = sum(a.count for a in peer.spec.resources.accelerators)
                    accelerators[peer.spec.cluster] = (
                        accelerators.get(peer.spec.cluster, 0) + devices
                    )
            key = (body["spec"]["cluster"], _state(conditions))
            counts[key] = counts.get(key, 0) + 1
        self.metrics.peers.clear()
        for (cluster, state), count in counts.items():
            self.metrics.peers.labels(cluster=cluster, state=state).set(count)
        self.metrics.accelerators.clear()
        for cluster, devices in accelerators.items():
            self.metrics.accelerators.labels(cluster=cluster).set(devices)


def _state(conditions: list[Condition]) -> str:
    """A peer's state as `edgellm_operator_peers` counts it."""
    if condition_status(conditions, "Reachable") == "False":
        return "unreachable"
    if condition_status(conditions, "Draining") == "True":
        return "draining"
    if condition_status(conditions, "Ready") == "True":
        return "ready"
    return "not_ready"
