"""The operator's long-running work: peer health, one mirror syncer per federation member, and
PeerNodes for labelled Nodes.

Created by the kopf startup handler (`app.py`) and fed by its watch handler; its loops run while
this operator leads (always when standalone; see `leadership`). Kubernetes calls
use the sync client in worker threads, each remote call with a timeout, so a member that is
down or partitioned slows only its own syncer. Decisions are the plain functions of
`peerhealth`, `nodepeers` and `edgellm.federation.mirror`.
"""

import asyncio
import base64
import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client
from pydantic import ValidationError

from edgellm.api import (
    ORIGIN_CLUSTER_LABEL,
    ConditionStatus,
    FederationMember,
    PeerModels,
    PeerNode,
    condition_status,
    set_condition,
)
from edgellm.federation.membership import Endpoint, Member, introduce, token_kubeconfig
from edgellm.federation.mirror import plan
from edgellm.federation.rbac import FEDERATION_NAMESPACE
from edgellm.kube import new_api_client
from edgellm.kvcache.index import KVIndex
from edgellm.kvcache.subscriptions import KVSubscriptions
from edgellm.operator import nodepeers, peerhealth
from edgellm.operator.events import EventRecorder
from edgellm.operator.metrics import OperatorMetrics
from edgellm.operator.requests import RequestRunner
from edgellm.operator.settings import OperatorSettings
from edgellm.scheduling import configured_profile, default_profile

logger = logging.getLogger(__name__)

GROUP, VERSION = "edgellm.io", "v1alpha1"
Body = dict[str, Any]


def _now() -> datetime:
    return datetime.now(UTC)


def _created(body: Body) -> datetime:
    return datetime.fromisoformat(body["metadata"]["creationTimestamp"])


def _conditions_wire(peer: PeerNode) -> list[Body]:
    return [c.to_wire() for c in peer.status.conditions]


class Runtime:
    def __init__(
        self,
        settings: OperatorSettings,
        local: client.ApiClient,
        metrics: OperatorMetrics,
    ) -> None:
        self.settings = settings
        self.local = local
        self.metrics = metrics
        self.peers: dict[str, Body] = {}
        self.events = EventRecorder(local, settings.cluster)
        self.peer_models = PeerModels()
        self.kv_events = KVSubscriptions(KVIndex())
        self.requests = RequestRunner(
            local,
            settings.cluster,
            self.events,
            self.peers,
            (
                configured_profile(settings.scheduler_profile)
                if settings.scheduler_profile
                else default_profile()
            ),
            settings.progress_interval_seconds,
            settings.inline_output_limit_bytes,
            self.kv_events.index,
            settings.kv_hash_seed,
            self.peer_models,
            metrics,
        )
        self.syncers: dict[str, MemberSyncer] = {}
        # False while this cluster's own apiserver fails: our view of our peers is then stale,
        # and mirroring it would overwrite what the other members rightly concluded.
        self.local_reachable = True
        # Set while this operator leads and its view of the peers is fresh: requests wait for it.
        self.leading = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts leading: a fresh view of the peers, then the health and federation loops."""
        # A request resumed after a restart or a takeover must not find an empty federation and
        # fail for want of peers; a standby's view misses what changed while another led.
        listed = await asyncio.to_thread(
            client.CustomObjectsApi(self.local).list_cluster_custom_object,
            GROUP,
            VERSION,
            "peernodes",
        )
        current = {p["metadata"]["name"]: p for p in listed["items"]}
        for name in self.peers.keys() - current.keys():
            self.on_peer_event("DELETED", self.peers[name])
        for peer in current.values():
            self.on_peer_event(None, peer)
        self._tasks = [
            asyncio.create_task(self._health_loop(), name="peer-health"),
            asyncio.create_task(self._members_loop(), name="federation-members"),
        ]
        self.leading.set()

    async def pause(self) -> None:
        """Stops the loops while another replica leads. The KV-event subscriptions go on: the
        index stays warm for a takeover."""
        self.leading.clear()
        syncers = list(self.syncers.values())
        self.syncers.clear()
        tasks = self._tasks + [s.task for s in syncers]
        self._tasks = []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for syncer in syncers:
            if syncer.member is not None:
                syncer.member.api.close()

    async def stop(self) -> None:
        await self.pause()
        await self.kv_events.stop()
        await self.requests.close()

    # --- peers -----------------------------------------------------------------------------

    def on_peer_event(self, event_type: str | None, body: Body) -> None:
        name = body["metadata"]["name"]
        if event_type == "DELETED":
            self.peers.pop(name, None)
            self.peer_models.forget(name)
            self.kv_events.update(name, None)
        else:
            self.peers[name] = body
            self.kv_events.update(name, body.get("spec"))
        if body.get("spec", {}).get("cluster") == self.settings.cluster:
            for syncer in self.syncers.values():
                syncer.wake.set()

    def own_peers(self) -> list[Body]:
        return [p for p in self.peers.values() if p["spec"]["cluster"] == self.settings.cluster]

    async def _health_loop(self) -> None:
        grace = timedelta(seconds=self.settings.peer_removal_grace_seconds)
        while True:
            now = _now()
            started = time.perf_counter()
            for body in list(self.peers.values()):
                try:
                    await self._check_peer(body, now, grace)
                except Exception:
                    logger.exception("checking peer %s failed", body["metadata"]["name"])
            self._count_peers()
            seconds = time.perf_counter() - started
            self.metrics.reconcile_duration.labels(controller="peer-health").observe(seconds)
            await asyncio.sleep(self.settings.health_interval_seconds)

    async def _check_peer(self, body: Body, now: datetime, grace: timedelta) -> None:
        name = body["metadata"]["name"]
        cluster = body["spec"]["cluster"]
        origin = body["metadata"].get("labels", {}).get(ORIGIN_CLUSTER_LABEL)
        if cluster != self.settings.cluster:
            if origin != cluster:  # neither ours nor a mirror: written to the wrong cluster
                await self._set_peer_condition(
                    body,
                    "Ready",
                    "False",
                    "WrongCluster",
                    f"spec.cluster is {cluster!r} but this is {self.settings.cluster!r}",
                )
            return
        peer = self.peer_models.get(body)
        if isinstance(peer, ValidationError):
            await self._set_peer_condition(body, "Ready", "False", "InvalidSpec", str(peer)[:1000])
            return
        verdict = peerhealth.assess(peer, now, _created(body), grace)
        for transition in verdict.transitions:
            await self.post_event(body, transition.type, transition.reason, transition.message)
        if verdict.remove:
            await asyncio.to_thread(self._delete_local_peer, name)
            return
        wire = [c.to_wire() for c in verdict.conditions]
        if (
            wire != _conditions_wire(peer)
            or peer.status.observed_generation != peer.metadata.generation
        ):
            status = {"conditions": wire, "observedGeneration": peer.metadata.generation}
            await asyncio.to_thread(self._patch_local_status, name, status)

    async def _set_peer_condition(
        self, body: Body, type_: str, status: ConditionStatus, reason: str, message: str
    ) -> None:
        """Sets one condition of a peer this operator does not assess (a mirror or a stray)."""
        peer = self.peer_models.get(body)
        conditions = [] if isinstance(peer, ValidationError) else peer.status.conditions
        updated, changed = set_condition(conditions, type_, status, reason, message, _now())
        if changed:
            await self.post_event(
                body, "Warning" if status == "False" else "Normal", reason, message
            )
            wire = [c.to_wire() for c in updated]
            await asyncio.to_thread(
                self._patch_local_status, body["metadata"]["name"], {"conditions": wire}
            )

    async def post_event(self, body: Body, type_: str, reason: str, message: str) -> None:
        await asyncio.to_thread(self.events.record, body, type_, reason, message)

    def _patch_local_status(self, name: str, status: Body) -> None:
        with contextlib.suppress(client.ApiException):  # deleted meanwhile: nothing to report
            client.CustomObjectsApi(self.local).patch_cluster_custom_object_status(
                GROUP, VERSION, "peernodes", name, {"status": status}
            )

    def _delete_local_peer(self, name: str) -> None:
        try:
            client.CustomObjectsApi(self.local).delete_cluster_custom_object(
                GROUP, VERSION, "peernodes", name
            )
        except client.ApiException as e:
            if e.status != 404:
                raise

    def _count_peers(self) -> None:
        counts: dict[tuple[str, str], int] = {}
        accelerators: dict[str, int] = {}
        self.metrics.heartbeat.clear()
        self.metrics.kv_cache_usage.clear()
        for body in self.peers.values():
            peer = self.peer_models.get(body)
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
            if condition_status(conditions, "Reachable") == "False":
                state = "unreachable"
            elif condition_status(conditions, "Draining") == "True":
                state = "draining"
            elif condition_status(conditions, "Ready") == "True":
                state = "ready"
            else:
                state = "not_ready"
            key = (body["spec"]["cluster"], state)
            counts[key] = counts.get(key, 0) + 1
        self.metrics.peers.clear()
        for (cluster, state), count in counts.items():
            self.metrics.peers.labels(cluster=cluster, state=state).set(count)
        self.metrics.accelerators.clear()
        for cluster, devices in accelerators.items():
            self.metrics.accelerators.labels(cluster=cluster).set(devices)

    async def mark_mirrors_unreachable(self, member: str, reason: str) -> None:
        for body in list(self.peers.values()):
            if body["spec"]["cluster"] == member:
                await self._set_peer_condition(
                    body, "Reachable", "False", "MemberUnreachable", f"{member}: {reason}"
                )

    # --- nodes -----------------------------------------------------------------------------

    def sync_node(self, node: Body) -> None:
        """Creates or updates the PeerNode of a labelled Node and copies its heartbeat."""
        with self.metrics.reconcile_duration.labels(controller="node").time():
            self._sync_node(node)

    def _sync_node(self, node: Body) -> None:
        objects = client.CustomObjectsApi(self.local)
        desired = nodepeers.peer_for_node(node, self.settings.cluster)
        name = desired["metadata"]["name"]
        try:
            current = objects.get_cluster_custom_object(GROUP, VERSION, "peernodes", name)
        except client.ApiException as e:
            if e.status != 404:
                raise
            objects.create_cluster_custom_object(GROUP, VERSION, "peernodes", desired)
        else:
            if current["spec"] != {**current["spec"], **desired["spec"]}:
                objects.patch_cluster_custom_object(
                    GROUP, VERSION, "peernodes", name, {"spec": desired["spec"]}
                )
        renewed: datetime | None = None
        with contextlib.suppress(client.ApiException):
            lease = client.CoordinationV1Api(self.local).read_namespaced_lease(
                node["metadata"]["name"], "kube-node-lease"
            )
            renewed = lease.spec.renew_time
        heartbeat = nodepeers.node_heartbeat(node, renewed)
        if heartbeat:
            objects.patch_cluster_custom_object_status(
                GROUP, VERSION, "peernodes", name, {"status": {"lastHeartbeatTime": heartbeat}}
            )

    # --- federation ------------------------------------------------------------------------

    async def _members_loop(self) -> None:
        while True:
            try:
                items = await asyncio.to_thread(self._list_members)
            except Exception as e:
                if self.local_reachable:
                    logger.warning("this cluster's apiserver fails, pausing mirroring: %s", e)
                self.local_reachable = False
                items = None
            else:
                self.local_reachable = True
            if items is not None:
                names = {m["metadata"]["name"] for m in items}
                for name in names - set(self.syncers):
                    self.syncers[name] = MemberSyncer(self, name)
                for name in set(self.syncers) - names:
                    syncer = self.syncers.pop(name)
                    syncer.task.cancel()
            reachable = sum(1 for s in self.syncers.values() if s.reachable)
            self.metrics.members.labels(state="reachable").set(reachable)
            self.metrics.members.labels(state="unreachable").set(len(self.syncers) - reachable)
            await asyncio.sleep(self.settings.sync_interval_seconds)

    def _list_members(self) -> list[Body]:
        result = client.CustomObjectsApi(self.local).list_cluster_custom_object(
            GROUP, VERSION, "federationmembers"
        )
        return list(result["items"])

    def connect(self, name: str) -> Member:
        """A client for a member, from its FederationMember and the credentials Secret."""
        body = client.CustomObjectsApi(self.local).get_cluster_custom_object(
            GROUP, VERSION, "federationmembers", name
        )
        spec = FederationMember.model_validate(body).spec
        secret = client.CoreV1Api(self.local).read_namespaced_secret(
            spec.credentials_secret, FEDERATION_NAMESPACE
        )
        token = base64.b64decode(secret.data["token"]).decode()
        endpoint = Endpoint(cluster=name, server=spec.server, ca_bundle=spec.ca_bundle)
        return Member(endpoint, new_api_client(token_kubeconfig(endpoint, token)))


class MemberSyncer:
    """Mirrors this cluster's peers into one member, probes it, and introduces it to the others."""

    MIN_GAP_SECONDS = 1.0

    def __init__(self, runtime: Runtime, name: str) -> None:
        self.runtime = runtime
        self.name = name
        self.wake = asyncio.Event()
        self.wake.set()
        self.reachable = False
        self.member: Member | None = None
        self.mirrored = 0
        self.last_success = time.monotonic()
        self.task = asyncio.create_task(self._run(), name=f"member-{name}")

    async def _run(self) -> None:
        settings = self.runtime.settings
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), settings.sync_interval_seconds)
            self.wake.clear()
            try:
                await self._sync_once()
            except Exception:  # a bug or this cluster's own apiserver: keep syncing regardless
                logger.exception("syncing with member %s failed", self.name)
            self.runtime.metrics.sync_lag.labels(member=self.name).set(
                time.monotonic() - self.last_success
            )
            await asyncio.sleep(self.MIN_GAP_SECONDS)

    async def _sync_once(self) -> None:
        if not self.runtime.local_reachable:
            return
        started = time.monotonic()
        try:
            if self.member is None:
                self.member = await asyncio.to_thread(self.runtime.connect, self.name)
            member = self.member
            members_there = await asyncio.to_thread(self._mirror, member)
        except Exception as e:  # the member (or the way to it) failed: it is unreachable
            await self._unreachable(e)
            return
        self.last_success = time.monotonic()
        self.runtime.metrics.sync_duration.labels(member=self.name).observe(
            self.last_success - started
        )
        if not self.reachable:
            logger.info("member %s is reachable", self.name)
        self.reachable = True
        await asyncio.to_thread(self._write_status, True, "MirrorsSynced", "")
        await self._introduce(member, members_there)

    def _mirror(self, member: Member) -> set[str]:
        """Applies the mirror plan in the member; returns the members it knows."""
        settings = self.runtime.settings
        timeout = settings.member_timeout_seconds
        objects = client.CustomObjectsApi(member.api)
        mirrors = objects.list_cluster_custom_object(
            GROUP,
            VERSION,
            "peernodes",
            label_selector=f"{ORIGIN_CLUSTER_LABEL}={settings.cluster}",
            _request_timeout=timeout,
        )["items"]
        own = self.runtime.own_peers()
        slack = min((p["spec"].get("heartbeatTTLSeconds", 30) for p in own), default=30) / 2
        changes = plan(own, mirrors, settings.cluster, slack)
        for mirror in changes.create:
            body = {k: v for k, v in mirror.items() if k != "status"}
            objects.create_cluster_custom_object(
                GROUP, VERSION, "peernodes", body, _request_timeout=timeout
            )
            changes.restatus.append(mirror)
        for mirror in changes.replace:
            objects.replace_cluster_custom_object(
                GROUP,
                VERSION,
                "peernodes",
                mirror["metadata"]["name"],
                {k: v for k, v in mirror.items() if k != "status"},
                _request_timeout=timeout,
            )
        for mirror in changes.restatus:
            objects.patch_cluster_custom_object_status(
                GROUP,
                VERSION,
                "peernodes",
                mirror["metadata"]["name"],
                {"status": mirror["status"]},
                _request_timeout=timeout,
            )
        for name in changes.delete:
            try:
                objects.delete_cluster_custom_object(
                    GROUP, VERSION, "peernodes", name, _request_timeout=timeout
                )
            except client.ApiException as e:
                if e.status != 404:
                    raise
        self.mirrored = len(own)
        known = objects.list_cluster_custom_object(
            GROUP, VERSION, "federationmembers", _request_timeout=timeout
        )["items"]
        return {m["metadata"]["name"] for m in known}

    async def _introduce(self, member: Member, members_there: set[str]) -> None:
        """Spreads membership: a member of ours that this member lacks is introduced to it."""
        for name, other in list(self.runtime.syncers.items()):
            if name in members_there or name == self.name or not other.reachable:
                continue
            if other.member is None:
                continue
            logger.info("introducing %s and %s", self.name, name)
            await asyncio.to_thread(introduce, member, other.member)

    def _write_status(self, reachable: bool, reason: str, message: str) -> None:
        objects = client.CustomObjectsApi(self.runtime.local)
        body = objects.get_cluster_custom_object(GROUP, VERSION, "federationmembers", self.name)
        status = FederationMember.model_validate(body).status
        now = _now()
        conditions, changed = set_condition(
            status.conditions,
            "Reachable",
            "True" if reachable else "False",
            "ProbeSucceeded" if reachable else "ProbeFailed",
            message,
            now,
        )
        conditions, synced_changed = set_condition(
            conditions, "Synced", "True" if reachable else "False", reason, message, now
        )
        mirrored = self.mirrored
        stale = status.last_probe_time is None or (now - status.last_probe_time) > timedelta(
            seconds=30
        )
        if changed or synced_changed or mirrored != status.mirrored_peers or stale:
            if changed:
                self.runtime.events.record(
                    body,
                    "Normal" if reachable else "Warning",
                    "MemberReachable" if reachable else "MemberUnreachable",
                    message or f"{self.name} answers",
                )
            objects.patch_cluster_custom_object_status(
                GROUP,
                VERSION,
                "federationmembers",
                self.name,
                {
                    "status": {
                        "conditions": [c.to_wire() for c in conditions],
                        "lastProbeTime": now.isoformat(),
                        "mirroredPeers": mirrored,
                    }
                },
            )

    async def _unreachable(self, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"[:500]
        if self.reachable:
            logger.warning("member %s is unreachable: %s", self.name, reason)
        self.reachable = False
        if self.member is not None:  # reconnect next time: the credentials may have changed
            self.member.api.close()
            self.member = None
        try:
            await asyncio.to_thread(self._write_status, False, "MemberUnreachable", reason)
        except Exception:
            logger.exception("recording that %s is unreachable failed", self.name)
        await self.runtime.mark_mirrors_unreachable(self.name, reason)
