"""Which models each peer's worker serves now, and how long it takes to answer the router: the
status page's "loaded" and round-trip columns.

A PeerNode says which models a peer holds on disk, not which one its worker has loaded; only
the worker can say, through OpenAI's `GET /v1/models` (which stock vLLM and llama-server answer
too). `Prober.run` asks every peer's worker every `interval` seconds, `concurrency` at a time,
and only while someone has looked at the status page within `watch_seconds` (`watched`): a
router nobody watches probes nothing; an interval of 0 turns probing off. The round trip is the
whole HTTP exchange as the router sees it, over the path the router takes to the worker: a
direct connection to its endpoint.
"""

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from edgellm.router.peers import PeerDirectory
from edgellm.workerapi import WorkerClient, WorkerError


@dataclass(frozen=True)
class Probe:
    at: datetime
    rtt_ms: float | None = None
    models: tuple[str, ...] | None = None
    """None when the worker did not answer."""
    error: str | None = None


class Prober:
    def __init__(
        self,
        peers: PeerDirectory,
        client: WorkerClient,
        *,
        interval: float = 10.0,
        watch_seconds: float = 60.0,
        concurrency: int = 32,
    ) -> None:
        self.peers = peers
        self.client = client
        self.interval = interval
        self.watch_seconds = watch_seconds
        self.results: dict[str, Probe] = {}
        self._slots = asyncio.Semaphore(concurrency)
        self._watched_until = 0.0
        self._wake = asyncio.Event()

    def watched(self) -> None:
        """Someone is looking: probe now if nobody was, and for `watch_seconds` more."""
        self._watched_until = time.monotonic() + self.watch_seconds
        self._wake.set()

    async def run(self) -> None:
        if self.interval <= 0:
            return
        while True:
            await self._wake.wait()
            self._wake.clear()
            while time.monotonic() < self._watched_until:
                await self.probe_all()
                await asyncio.sleep(self.interval)

    async def probe_all(self) -> None:
        endpoints = {name: peer.spec.endpoint for name, peer in self.peers.peers.items()}
        probes = await asyncio.gather(*(self._probe(e) for e in endpoints.values()))
        self.results.clear()  # in place: the status page's sources hold this dict
        self.results.update(zip(endpoints, probes, strict=True))

    async def _probe(self, endpoint: str) -> Probe:
        async with self._slots:
            started = time.perf_counter()
            try:
                models = await self.client.models(endpoint)
            except WorkerError as e:
                return Probe(datetime.now(UTC), error=str(e)[:300])
            rtt = (time.perf_counter() - started) * 1000
            return Probe(datetime.now(UTC), rtt, tuple(models))
