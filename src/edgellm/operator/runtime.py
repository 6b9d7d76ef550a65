"""The operator's long-running work, started and paused with its leadership.

Created by the kopf startup handler (`app.py`) and fed by its watch handlers: `PeerView`
(`peers.py`) keeps every PeerNode and judges this cluster's peers' health, `FederationSync`
(`federationsync.py`) mirrors them into the other members, `sync_node` (`nodesync.py`) turns
labelled Nodes into peers, and the `RequestRunner` answers InferenceRequests over that view.
The loops run while this operator leads (always when standalone; see `leadership`). Kubernetes
calls use the sync client in worker threads.
"""

import asyncio
from typing import Any

from kubernetes import client

from edgellm.operator.events import EventRecorder
from edgellm.operator.federationsync import FederationSync
from edgellm.operator.metrics import OperatorMetrics
from edgellm.operator.nodesync import sync_node
from edgellm.operator.peers import PeerView
from edgellm.operator.requests import RequestRunner
from edgellm.operator.settings import OperatorSettings
from edgellm.scheduling import configured_profile, default_profile


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
        self.events = EventRecorder(local, settings.cluster)
        self.peers = PeerView(
            local=local,
            settings=settings,
            events=self.events,
            metrics=metrics,
            on_own_change=lambda: self.federation.wake(),
        )
        self.federation = FederationSync(
            local=local, settings=settings, events=self.events, metrics=metrics, peers=self.peers
        )
        profile = settings.scheduler_profile
        self.requests = RequestRunner(
            local=local,
            cluster=settings.cluster,
            events=self.events,
            peers=self.peers.bodies,
            profile=configured_profile(profile) if profile else default_profile(),
            progress_interval=settings.progress_interval_seconds,
            inline_output_limit=settings.inline_output_limit_bytes,
            kv_index=self.peers.kv_events.index,
            kv_hash_seed=settings.kv_hash_seed,
            peer_models=self.peers.models,
            metrics=metrics,
        )
        # Set while this operator leads and its view of the peers is fresh: requests wait for it.
        self.leading = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Starts leading: a fresh view of the peers, then the health and federation loops."""
        # A request resumed after a restart or a takeover must not find an empty federation and
        # fail for want of peers; a standby's view misses what changed while another led.
        await self.peers.refresh()
        self._tasks = [
            asyncio.create_task(self.peers.health(), name="peer-health"),
            asyncio.create_task(self.federation.run(), name="federation-members"),
        ]
        self.leading.set()

    async def pause(self) -> None:
        """Stops the loops while another replica leads. The KV-event subscriptions go on: the
        index stays warm for a takeover."""
        self.leading.clear()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.federation.stop()

    async def stop(self) -> None:
        await self.pause()
        await self.peers.kv_events.stop()
        await self.requests.close()

    def on_peer_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        self.peers.on_event(event_type, body)

    def sync_node(self, node: dict[str, Any]) -> None:
        """Creates or updates the PeerNode of a labelled Node and copies its heartbeat."""
        with self.metrics.reconcile_duration.labels(controller="node").time():
            sync_node(self.local, node, self.settings.cluster)
