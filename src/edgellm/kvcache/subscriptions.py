"""A KV index fed by a ZMQ subscription to every peer that publishes KV events.

The operator and the router each keep one: the scheduler asks it how much of a prompt each peer
already holds (the prefix-cache-overlap scorer). A peer advertises its publisher in
spec.kvEvents; the owner calls `update` whenever it sees the peer, and a peer removed or changed
is forgotten. Batches lost in
flight leave the index stale for a while, never wrong for long: the next batch of a worker that
served another prompt says what it now holds.
"""

import asyncio
import contextlib
import logging
from typing import Any

import zmq
import zmq.asyncio

from edgellm.kvcache import DEFAULT_TOPIC, EventDecodeError, decode_batch
from edgellm.kvcache.index import KVIndex

logger = logging.getLogger(__name__)


class KVSubscriptions:
    def __init__(self, index: KVIndex) -> None:
        self.index = index
        self._context = zmq.asyncio.Context()
        self._subscribed: dict[str, tuple[str, str, asyncio.Task[None]]] = {}

    def update(self, peer: str, spec: dict[str, Any] | None) -> None:
        """Follows a peer's spec.kvEvents; None when the peer is gone."""
        source = (spec or {}).get("kvEvents")
        wanted = (source["endpoint"], source.get("topic", DEFAULT_TOPIC)) if source else None
        current = self._subscribed.get(peer)
        if current is not None and current[:2] == wanted:
            return
        if current is not None:
            current[2].cancel()
            del self._subscribed[peer]
            self.index.forget(peer)
        if wanted is not None:
            task = asyncio.create_task(self._receive(peer, *wanted), name=f"kv-events-{peer}")
            self._subscribed[peer] = (*wanted, task)

    async def _receive(self, peer: str, endpoint: str, topic: str) -> None:
        socket = self._context.socket(zmq.SUB)
        socket.connect(endpoint)  # ZMQ reconnects by itself while the worker is away
        socket.subscribe(topic.encode())
        logger.info("following the KV events of %s at %s", peer, endpoint)
        try:
            while True:
                frames = await socket.recv_multipart()
                try:
                    batch = decode_batch(frames[-1])
                except EventDecodeError as e:
                    logger.warning("KV events of %s: %s", peer, e)
                    continue
                self.index.apply(peer, batch.events)
        finally:
            socket.close(linger=0)

    async def stop(self) -> None:
        tasks = [task for *_, task in self._subscribed.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._context.term()
