"""The llama.cpp backend as the worker serves it: one generation at a time over one context, and
KV shared with other llama.cpp workers of the same model.

`LlamaCppWorker` implements `backend.Backend` over the engine of `llamacpp.py`. llama.cpp's
context is single, so generations take turns (`turn`); waiting ones wait in the event loop, not
in threads, which would starve the one that holds it. After each generation the context's
tokens are reported: the KV-cache use of the peer's load, and KV events (`--kv-events`).

Prefill/decode disaggregation: `prefill` computes a prompt's KV and keeps the state (`KVStore`)
under the request's id; the decode worker's `kv_from` names this worker's `/v1/kv/{id}`, and
`generate` fetches that state once it has the model's turn, loads it and generates. A state it
cannot have or load is only a lost shortcut: it computes the prompt.

With IPFS (`ipfs_kv`, see `ipfskv.py`), the state of every long prompt is also saved to this
peer's Kubo in the background and announced: `announcement` serves the signed announcement for
`GET /v1/kv/ipfs/{block_hash}`, and a `kv_from` naming such a URL loads the state through this
worker's own Kubo.
"""

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import httpx

from edgellm.kvcache import ExternalBlockHash
from edgellm.worker.backend import (
    Generation,
    GenerationJob,
    InvalidJobError,
    NoRoomError,
    Piece,
    Run,
    UnsupportedError,
    Usage,
)
from edgellm.worker.ipfskv import IPFSKV, IPFSKVError, Prefix, announced_block, announcement_json
from edgellm.worker.kvevents import KVEvents
from edgellm.worker.llamacpp import KVStateError, LlamaCppBackend
from edgellm.worker.metrics import WorkerMetrics
from edgellm.workerapi.protocol import KVTransfer, PrefillResponse

logger = logging.getLogger(__name__)
T = TypeVar("T")

KV_FETCH_TIMEOUT: Final = httpx.Timeout(5.0, connect=2.0)
"""Per connect and per read: a prefill peer gone must not hold the model's turn for long."""


class KVStore:
    """Prefilled KV states waiting for their decode worker, by request id.

    Bounded by count and bytes, the oldest dropped first, and by age: a state that nobody
    fetched (its decode peer died, or the router changed its mind) must not hold memory.
    """

    def __init__(
        self,
        *,
        max_states: int = 16,
        max_bytes: int = 1 << 30,
        ttl: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_states = max_states
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._states: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    def put(self, key: str, state: bytes) -> bool:
        """Keeps `state` under `key`, replacing what was there; False if it alone is too big."""
        if len(state) > self.max_bytes:
            return False
        self.take(key)
        self._states[key] = (self._clock(), state)
        self._bytes += len(state)
        self._expire()
        while len(self._states) > self.max_states or self._bytes > self.max_bytes:
            self._drop(next(iter(self._states)))
        return True

    def take(self, key: str) -> bytes | None:
        """The state under `key`, removed: each is fetched once."""
        self._expire()
        return self._drop(key) if key in self._states else None

    def _expire(self) -> None:
        oldest = self._clock() - self.ttl
        while self._states and next(iter(self._states.values()))[0] < oldest:
            self._drop(next(iter(self._states)))

    def _drop(self, key: str) -> bytes:
        _, state = self._states.pop(key)
        self._bytes -= len(state)
        return state

    def __len__(self) -> int:
        return len(self._states)


@dataclass(frozen=True)
class Fetched:
    """A KV state fetched for a prompt, and whence: `tokens` of it begin the prompt (None: all)."""

    state: bytes
    seconds: float
    source: Literal["peer", "ipfs"]
    tokens: int | None = None
    manifest: str | None = None


async def _download(url: str, limit: int) -> bytes:
    """The body of a GET, refused past `limit` bytes without reading the rest."""
    async with (
        httpx.AsyncClient(timeout=KV_FETCH_TIMEOUT) as http,
        http.stream("GET", url) as response,
    ):
        response.raise_for_status()
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise KVStateError(f"the KV state at {url} is over {limit} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


class LlamaCppWorker:
    """A GGUF model served whole by llama.cpp, taking one generation at a time."""

    def __init__(
        self,
        llama: LlamaCppBackend,
        *,
        metrics: WorkerMetrics,
        kv_events: KVEvents | None = None,
        kv_store: KVStore | None = None,
        ipfs_kv: IPFSKV | None = None,
    ) -> None:
        self.llama = llama
        self.metrics = metrics
        self.kv_events = kv_events
        self.store = KVStore() if kv_store is None else kv_store
        self.ipfs_kv = ipfs_kv
        self.turn = asyncio.Lock()  # one generation at a time: llama.cpp's context is single
        self._saves: set[asyncio.Task[None]] = set()  # kept, or the loop may collect them
        if kv_events is not None:
            kv_events.publisher.publish([kv_events.tracker.clear()])
            metrics.count_kv_blocks(lambda: len(kv_events.tracker.blocks))

    @property
    def context(self) -> int:
        return self.llama.context

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.llama.chat_prompt(messages)

    async def tokenize(self, text: str) -> list[int]:
        # Tokenizing touches only the vocabulary, not the context a generation may be using.
        return self.llama.tokenize(text)

    def running(self, in_flight: int) -> int:
        return 1 if self.turn.locked() else 0

    async def start(self) -> None:
        if self.ipfs_kv is not None:
            try:
                await self.ipfs_kv.start()
            except IPFSKVError as e:
                logger.warning("the pins of an earlier run are not counted: %s", e)

    async def stop(self) -> None:
        """Saves to IPFS still running are cancelled."""
        for task in self._saves:
            task.cancel()
        await asyncio.gather(*self._saves, return_exceptions=True)
        if self.ipfs_kv is not None:
            await self.ipfs_kv.aclose()

    async def generate(self, job: GenerationJob, run: Run) -> Generation:
        if job.split is not None:
            raise InvalidJobError(
                "this worker serves its model whole; split plans go to a worker started"
                " with --split"
            )
        if job.kv_transfer_params is not None:
            raise UnsupportedError("a llama.cpp worker loads KV with kv_from, not LMCache")
        # Waiting requests wait here, not in worker threads: threads blocked on the model's
        # lock would starve the one generation that holds it. A caller cancelled meanwhile
        # (its client gone) never gets the turn.
        await self.turn.acquire()
        try:
            # Fetched once the model is ours, so waiting requests hold no states: the prefill
            # peer keeps it meanwhile.
            fetched = await self._fetch(job.kv_from, job.prompt) if job.kv_from else None
        except BaseException:  # the client left while it was fetched
            self.turn.release()
            raise
        pieces: Iterator[Piece] = self.llama.generate(
            job.prompt, job.sampling, run.usage, run.cancelled
        )
        if fetched is not None:
            pieces = self._loading(fetched, job.prompt, run.usage, pieces)

        def release() -> "asyncio.Future[Any] | None":
            # The model is idle: its state may be read, and exporting it for IPFS goes on in a
            # thread, holding the turn until it is done.
            self._context_changed()
            exported = self._export_for_ipfs(run.usage.prompt_tokens)
            if exported is None:
                self.turn.release()
            else:
                exported.add_done_callback(lambda _: self.turn.release())
            return exported

        return Generation(pieces, run, release=release)

    async def prefill(self, job: GenerationJob) -> PrefillResponse:
        usage = Usage()

        def work() -> tuple[float, bytes, list[int]]:
            seconds = self.llama.prefill(job.prompt, job.sampling.max_tokens, usage)
            self._context_changed()
            return seconds, self.llama.export_kv_state(), self.llama.context_tokens()

        seconds, state, held = await self._in_turn(work)
        self.metrics.learn_prefill_rate(usage.prompt_tokens - usage.cached_tokens, seconds)
        claimed = self.ipfs_kv.claim(held[: usage.prompt_tokens]) if self.ipfs_kv else None
        if claimed is not None:
            exported = asyncio.get_running_loop().create_future()
            exported.set_result(state)
            self._share(claimed, exported)
        if not self.store.put(job.request_id, state):
            limit = self.store.max_bytes
            raise NoRoomError(f"the KV state has {len(state)} bytes, over the {limit} kept")
        return PrefillResponse(
            id=job.request_id,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            prefill_seconds=round(seconds, 4),
            state_bytes=len(state),
        )

    async def kv_state(self, key: str) -> bytes | None:
        # Async, as the store is the event loop's alone.
        return self.store.take(key)

    async def announcement(self, block_hash: int) -> dict[str, Any] | None:
        found = self.ipfs_kv.announcement(ExternalBlockHash(block_hash)) if self.ipfs_kv else None
        return None if found is None else announcement_json(found)

    async def _in_turn(self, work: Callable[[], T]) -> T:
        """Runs `work` in a thread while holding the model's turn. A caller cancelled meanwhile
        (its client gone) leaves the turn held until the thread has left the model."""
        await self.turn.acquire()
        step = asyncio.ensure_future(asyncio.to_thread(work))
        step.add_done_callback(lambda _: self.turn.release())
        return await asyncio.shield(step)

    def _context_changed(self) -> None:
        """Reports what the context now holds; called while the turn is held."""
        held = self.llama.context_tokens()
        self.metrics.load.kv_cache_usage = round(len(held) / self.llama.context, 3)
        if self.kv_events is not None:
            self.kv_events.after_generation(held)

    async def _fetch(self, url: str, text: str) -> Fetched | None:
        """The KV state `url` names for the prompt `text`, from a prefill peer or through IPFS,
        or None (logged and counted)."""
        started = time.monotonic()
        transfers = self.metrics.kv_transfers
        if announced_block(url) is not None:
            if self.ipfs_kv is None:
                logger.warning("computing the prompt: %s is KV in IPFS, and no daemon is set", url)
                transfers.labels("failed", "ipfs").inc()
                return None
            try:
                restored = await self.ipfs_kv.fetch(url, self.llama.tokenize(text))
            except IPFSKVError as e:
                logger.warning("computing the prompt: no KV from IPFS via %s: %s", url, e)
                transfers.labels("failed", "ipfs").inc()
                return None
            seconds = time.monotonic() - started
            self.metrics.ipfs_fetch_seconds.observe(seconds)
            self.metrics.ipfs_bytes.labels("get").inc(len(restored.state))
            return Fetched(restored.state, seconds, "ipfs", restored.tokens, restored.manifest)
        try:
            state = await _download(url, self.store.max_bytes)
        except (httpx.HTTPError, KVStateError) as e:
            logger.warning("computing the prompt: no KV state from %s: %s", url, e)
            transfers.labels("failed", "peer").inc()
            return None
        self.metrics.kv_transfer_bytes.inc(len(state))
        return Fetched(state, time.monotonic() - started, "peer")

    def _loading(
        self, fetched: Fetched, text: str, usage: Usage, pieces: Iterator[Piece]
    ) -> Iterator[Piece]:
        """Loads a fetched state into the context, then generates: in the generation's thread,
        as loading touches the model. A state refused is logged, and the prompt computed;
        `usage.kv_transfer` says what was loaded."""
        started = time.monotonic()
        try:
            loaded = self.llama.import_kv_state(
                fetched.state, self.llama.tokenize(text), fetched.tokens
            )
        except KVStateError as e:
            logger.warning("computing the prompt: its KV state was refused: %s", e)
            self.metrics.kv_transfers.labels("failed", fetched.source).inc()
        else:
            self.metrics.kv_transfers.labels("loaded", fetched.source).inc()
            usage.kv_transfer = KVTransfer(
                bytes=len(fetched.state),
                seconds=round(fetched.seconds + time.monotonic() - started, 4),
                tokens=loaded,
                source=fetched.source,
                manifest=fetched.manifest,
            )
        yield from pieces

    def _export_for_ipfs(self, prompt_tokens: int) -> "asyncio.Future[Any] | None":
        """After a generation, while the turn is held: exports the state in a thread (the turn
        waits on the future returned) when the prompt is worth saving to IPFS."""
        if self.ipfs_kv is None:
            return None
        prefix = self.ipfs_kv.claim(self.llama.context_tokens()[:prompt_tokens])
        if prefix is None:
            return None
        exported = asyncio.ensure_future(asyncio.to_thread(self.llama.export_kv_state))
        self._share(prefix, exported)
        return exported

    def _share(self, prefix: Prefix, state: Awaitable[bytes]) -> None:
        """Saves a prefix's KV state (being exported) to IPFS in the background."""
        ipfs_kv = self.ipfs_kv
        assert ipfs_kv is not None

        async def save() -> None:
            try:
                data = await state
            except Exception:  # llama.cpp could not write its state: nothing to share
                ipfs_kv.release(prefix)
                logger.exception("not sharing a prompt's KV through IPFS: no state")
                return
            started = time.monotonic()
            try:
                announced = await ipfs_kv.save(prefix, data)
            except IPFSKVError as e:
                logger.warning("not sharing a prompt's KV through IPFS: %s", e)
                return
            self.metrics.ipfs_bytes.labels("put").inc(len(data))
            self.metrics.ipfs_save_seconds.observe(time.monotonic() - started)
            logger.info(
                "the KV of %d tokens (%d bytes) is in IPFS as %s after %.3f s",
                len(prefix.tokens),
                len(data),
                announced.manifest,
                time.monotonic() - started,
            )

        task = asyncio.ensure_future(save())
        self._saves.add(task)
        task.add_done_callback(self._saves.discard)
