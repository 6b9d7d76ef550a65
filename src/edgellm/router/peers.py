"""The router's view of the federation: every PeerNode its cluster knows, mirrors of the other
members' peers included, plus what only the router sees (requests in flight, peers that just
failed).

The cluster is listed every `refresh` seconds rather than watched: a list of peers is small, and
a poll cannot miss an event. Each listing also follows the peers' KV-event publishers. A peer that
fails a request is left out for `cooldown` seconds, before its heartbeat could say so: that is
how a dead worker, or a member gone away, is routed around at once.
"""

import asyncio
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from kubernetes import client

from edgellm.api import PeerModels, PeerNode
from edgellm.kube import objects
from edgellm.kvcache.subscriptions import KVSubscriptions

logger = logging.getLogger(__name__)


def why(error: Exception) -> str:
    """A failed Kubernetes call in a few words: urllib3's retries wrap the cause in a paragraph
    that names the pool and the URL."""
    cause = getattr(error, "reason", None) or error
    return (str(cause) or type(cause).__name__).rsplit("): ", 1)[-1]


class PeerDirectory:
    def __init__(
        self, api: client.ApiClient | None, kv: KVSubscriptions, cooldown: float = 10.0
    ) -> None:
        self._api = api
        self.kv = kv
        self.cooldown = cooldown
        self.peers: dict[str, PeerNode] = {}
        self.in_flight: Counter[str] = Counter()
        self._models = PeerModels()
        self._failed_until: dict[str, float] = {}
        self._invalid: set[str] = set()
        self.listed: datetime | None = None
        """When the cluster last listed its peers."""
        self.list_error: str | None = None
        """Why the last listing failed; None once one succeeds."""

    def set_peers(self, bodies: list[dict[str, Any]]) -> None:
        """Replaces the known peers by these PeerNode bodies; invalid ones are skipped."""
        peers, invalid = {}, set()
        for body in bodies:
            name = body["metadata"]["name"]
            peer = self._models.get(body)
            if isinstance(peer, PeerNode):
                peers[name] = peer
            else:
                invalid.add(name)
                if name not in self._invalid:  # once, not at every listing
                    logger.warning("PeerNode %s is not valid, not routing to it: %s", name, peer)
            self.kv.update(name, body.get("spec"))
        self._invalid = invalid
        for gone in self.peers.keys() - peers.keys():
            self._models.forget(gone)
            self.kv.update(gone, None)
        self.peers = peers

    async def refresh(self) -> None:
        assert self._api is not None, "a directory without a cluster is filled by set_peers"
        self.set_peers(await asyncio.to_thread(objects.list_objects, self._api, objects.PEER_NODES))
        self.listed, self.list_error = datetime.now(UTC), None

    async def follow(self, interval: float) -> None:
        """Refreshes forever; a cluster that does not answer keeps the last peers known."""
        while True:
            try:
                await self.refresh()
            except Exception as e:  # any failure to list: keep serving what is known
                logger.warning("cannot list the PeerNodes: %s", e)
                self.list_error = why(e)
            await asyncio.sleep(interval)

    def failed(self, name: str) -> None:
        self._failed_until[name] = time.monotonic() + self.cooldown

    def failing(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(name for name, until in self._failed_until.items() if until > now)

    def holders(self, model: str) -> list[PeerNode]:
        return [p for p in self.peers.values() if any(m.name == model for m in p.spec.models)]

    def models(self) -> list[str]:
        """Every model the federation's peers hold."""
        return sorted({model.name for peer in self.peers.values() for model in peer.spec.models})
