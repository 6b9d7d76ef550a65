"""Mirroring this cluster's peers into every other member of the federation.

While the operator leads, `FederationSync.run` lists the FederationMembers every
`sync_interval_seconds` and keeps one `MemberSyncer` per member. A syncer connects with the
member's credentials, applies the mirror plan there (`edgellm.federation.mirror.plan`),
introduces it to the members it lacks, and writes what it saw into the FederationMember's
status; a member that fails is unreachable, and so are its peers' mirrors here. Each call to a
member has its own timeout, so a member that is down or partitioned slows only its own syncer.
"""

import asyncio
import base64
import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client

from edgellm.api import ORIGIN_CLUSTER_LABEL, FederationMember, set_condition
from edgellm.federation.membership import Endpoint, Member, introduce, token_kubeconfig
from edgellm.federation.mirror import plan
from edgellm.federation.rbac import FEDERATION_NAMESPACE
from edgellm.kube import NotFoundError, new_api_client, objects, translated
from edgellm.operator.events import EventRecorder
from edgellm.operator.metrics import OperatorMetrics
from edgellm.operator.peers import PeerView
from edgellm.operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

Body = dict[str, Any]


class FederationSync:
    def __init__(
        self,
        *,
        local: client.ApiClient,
        settings: OperatorSettings,
        events: EventRecorder,
        metrics: OperatorMetrics,
        peers: PeerView,
    ) -> None:
        self.local = local
        self.settings = settings
        self.events = events
        self.metrics = metrics
        self.peers = peers
        self.syncers: dict[str, MemberSyncer] = {}
        # False while this cluster's own apiserver fails: our view of our peers is then stale,
        # and mirroring it would overwrite what the other members rightly concluded.
        self.local_reachable = True

    def wake(self) -> None:
        """Our own peers changed: every member's mirrors are due now."""
        for syncer in self.syncers.values():
            syncer.wake.set()

    async def run(self) -> None:
        """Keeps one syncer per FederationMember, for as long as it runs."""
        while True:
            try:
                items = await asyncio.to_thread(
                    objects.list_objects, self.local, objects.FEDERATION_MEMBERS
                )
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
                    self.syncers.pop(name).task.cancel()
            reachable = sum(1 for s in self.syncers.values() if s.reachable)
            self.metrics.members.labels(state="reachable").set(reachable)
            self.metrics.members.labels(state="unreachable").set(len(self.syncers) - reachable)
            await asyncio.sleep(self.settings.sync_interval_seconds)

    async def stop(self) -> None:
        """Stops every syncer and closes its member's client."""
        syncers = list(self.syncers.values())
        self.syncers.clear()
        for syncer in syncers:
            syncer.task.cancel()
        await asyncio.gather(*(s.task for s in syncers), return_exceptions=True)
        for syncer in syncers:
            if syncer.member is not None:
                syncer.member.api.close()

    def connect(self, name: str) -> Member:
        """A client for a member, from its FederationMember and the credentials Secret."""
        body = objects.get(self.local, objects.FEDERATION_MEMBERS, name)
        spec = FederationMember.model_validate(body).spec
        with translated():
            secret = client.CoreV1Api(self.local).read_namespaced_secret(
                spec.credentials_secret, FEDERATION_NAMESPACE
            )
        token = base64.b64decode(secret.data["token"]).decode()
        endpoint = Endpoint(cluster=name, server=spec.server, ca_bundle=spec.ca_bundle)
        return Member(endpoint, new_api_client(token_kubeconfig(endpoint, token)))


class MemberSyncer:
    """Mirrors this cluster's peers into one member, probes it, and introduces it to the others."""

    MIN_GAP_SECONDS = 1.0

    def __init__(self, federation: FederationSync, name: str) -> None:
        self.federation = federation
        self.name = name
        self.wake = asyncio.Event()
        self.wake.set()
        self.reachable = False
        self.member: Member | None = None
        self.mirrored = 0
        self.last_success = time.monotonic()
        self.task = asyncio.create_task(self._run(), name=f"member-{name}")

    async def _run(self) -> None:
        federation = self.federation
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), federation.settings.sync_interval_seconds)
            self.wake.clear()
            try:
                await self._sync_once()
            except Exception:  # a bug or this cluster's own apiserver: keep syncing regardless
                logger.exception("syncing with member %s failed", self.name)
            federation.metrics.sync_lag.labels(member=self.name).set(
                time.monotonic() - self.last_success
            )
            await asyncio.sleep(self.MIN_GAP_SECONDS)

    async def _sync_once(self) -> None:
        if not self.federation.local_reachable:
            return
        started = time.monotonic()
        try:
            if self.member is None:
                self.member = await asyncio.to_thread(self.federation.connect, self.name)
            member = self.member
            members_there = await asyncio.to_thread(self._mirror, member)
        except Exception as e:  # the member (or the way to it) failed: it is unreachable
            await self._unreachable(e)
            return
        self.last_success = time.monotonic()
        self.federation.metrics.sync_duration.labels(member=self.name).observe(
            self.last_success - started
        )
        if not self.reachable:
            logger.info("member %s is reachable", self.name)
        self.reachable = True
        await asyncio.to_thread(self._write_status, True, "MirrorsSynced", "")
        await self._introduce(member, members_there)

    def _mirror(self, member: Member) -> set[str]:
        """Applies the mirror plan in the member; returns the members it knows."""
        cluster = self.federation.settings.cluster
        timeout = self.federation.settings.member_timeout_seconds
        api, peers = member.api, objects.PEER_NODES
        selector = f"{ORIGIN_CLUSTER_LABEL}={cluster}"
        mirrors = objects.list_objects(api, peers, label_selector=selector, timeout=timeout)
        own = self.federation.peers.own()
        slack = min((p["spec"].get("heartbeatTTLSeconds", 30) for p in own), default=30) / 2
        changes = plan(own, mirrors, cluster, slack)
        for mirror in changes.create:
            objects.create(api, peers, _without_status(mirror), timeout=timeout)
            changes.restatus.append(mirror)
        for mirror in changes.replace:
            objects.replace(api, peers, _without_status(mirror), timeout=timeout)
        for mirror in changes.restatus:
            name = mirror["metadata"]["name"]
            objects.patch_status(api, peers, name, mirror["status"], timeout=timeout)
        for name in changes.delete:
            with contextlib.suppress(NotFoundError):
                objects.delete(api, peers, name, timeout=timeout)
        self.mirrored = len(own)
        known = objects.list_objects(api, objects.FEDERATION_MEMBERS, timeout=timeout)
        return {m["metadata"]["name"] for m in known}

    async def _introduce(self, member: Member, members_there: set[str]) -> None:
        """Spreads membership: a member of ours that this member lacks is introduced to it."""
        for name, other in list(self.federation.syncers.items()):
            if name in members_there or name == self.name or not other.reachable:
                continue
            if other.member is None:
                continue
            logger.info("introducing %s and %s", self.name, name)
            await asyncio.to_thread(introduce, member, other.member)

    def _write_status(self, reachable: bool, reason: str, message: str) -> None:
        local = self.federation.local
        body = objects.get(local, objects.FEDERATION_MEMBERS, self.name)
        status = FederationMember.model_validate(body).status
        now = datetime.now(UTC)
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
                self.federation.events.record(
                    body,
                    "Normal" if reachable else "Warning",
                    "MemberReachable" if reachable else "MemberUnreachable",
                    message or f"{self.name} answers",
                )
            wire = {
                "conditions": [c.to_wire() for c in conditions],
                "lastProbeTime": now.isoformat(),
                "mirroredPeers": mirrored,
            }
            objects.patch_status(local, objects.FEDERATION_MEMBERS, self.name, wire)

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
        await self.federation.peers.mark_mirrors_unreachable(self.name, reason)


def _without_status(body: Body) -> Body:
    return {k: v for k, v in body.items() if k != "status"}
