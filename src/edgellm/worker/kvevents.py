"""KV events of the llama.cpp worker, sent the way vLLM sends its own.

The router's KV index subscribes to every worker and must not care which engine it runs.
`KVBlockTracker` turns the tokens a llama.cpp context holds after each generation into
BlockStored/BlockRemoved events, named by vLLM's block hashes (pure logic). `ZmqEventPublisher`
sends batches of them on a ZMQ PUB socket in vLLM's frames `(topic, 8-byte big-endian sequence
number, msgpack batch)`, and serves vLLM's replay of missed batches on an optional ROUTER socket.
The worker's server owns one of each: it calls `update` after every generation and `publish`s
what comes back.

Publisher read from vLLM main (June 2026), `ZmqEventPublisher` in
`vllm/distributed/kv_events.py` at 0181ea3173e5.
"""

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import zmq

from edgellm.kvcache import (
    DEFAULT_BLOCK_SIZE,
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    ExternalBlockHash,
    KVEvent,
    KVEventBatch,
    block_hashes,
    encode_batch,
    external_hash,
)

logger = logging.getLogger(__name__)


class KVBlockTracker:
    """What one llama.cpp context holds, as vLLM blocks, and the events that change it.

    llama.cpp keeps one sequence per context and reuses the longest common prefix of the next
    prompt, so after each generation the held blocks are the full blocks of its tokens: the
    blocks past the first difference are gone, the new ones are stored.
    """

    def __init__(
        self, seed: str, block_size: int = DEFAULT_BLOCK_SIZE, medium: str = MEDIUM_GPU
    ) -> None:
        """`seed` and `block_size` must be those of every worker feeding the same index (for a
        vLLM worker: its PYTHONHASHSEED and --block-size); `medium` is the tier in vLLM's terms:
        the context's KV is the engine's own pool, "GPU" whether it lives in RAM or VRAM.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be positive, not {block_size}")
        self.seed = seed
        self.block_size = block_size
        self.medium = medium
        self._tokens: list[int] = []  # the tokens of the held full blocks
        self._hashes: list[BlockHash] = []

    @property
    def blocks(self) -> list[ExternalBlockHash]:
        """The held blocks' hashes as events carry them, first block first."""
        return [external_hash(h) for h in self._hashes]

    def update(self, tokens: Sequence[int]) -> list[KVEvent]:
        """Events that take the index from the last update to `tokens`, the tokens whose KV the
        context now holds (llama-cpp-python: `llama.input_ids[: llama.n_tokens].tolist()`)."""
        size = self.block_size
        held = [int(token) for token in tokens]  # numpy ints would not encode
        count = len(held) // size
        kept = 0  # leading blocks held before and now
        while kept < min(count, len(self._hashes)) and (
            held[kept * size : (kept + 1) * size] == self._tokens[kept * size : (kept + 1) * size]
        ):
            kept += 1
        events: list[KVEvent] = []
        if kept < len(self._hashes):
            # vLLM evicts before it caches the blocks that reuse the space.
            removed = [external_hash(h) for h in self._hashes[kept:]]
            events.append(BlockRemoved(block_hashes=removed, medium=self.medium))
        new_tokens = held[kept * size : count * size]
        parent = self._hashes[kept - 1] if kept else None
        new = block_hashes(new_tokens, size, parent, seed=self.seed)
        if new:
            events.append(
                BlockStored(
                    block_hashes=[external_hash(h) for h in new],
                    parent_block_hash=external_hash(parent) if parent is not None else None,
                    token_ids=new_tokens,
                    block_size=size,
                    lora_id=None,
                    medium=self.medium,
                    lora_name=None,
                    # As vLLM sends them: one entry per block, None without LoRA or images.
                    extra_keys=[None] * len(new),
                )
            )
        self._tokens = self._tokens[: kept * size] + new_tokens
        self._hashes = self._hashes[:kept] + new
        return events

    def clear(self) -> AllBlocksCleared:
        """Forgets every block: for a reset context, a new model, or a worker (re)starting."""
        self._tokens = []
        self._hashes = []
        return AllBlocksCleared()


class ZmqEventPublisher:
    """Publishes KV event batches on a ZMQ PUB socket, as vLLM's `ZmqEventPublisher` does.

    `endpoint` binds when it has a wildcard (`tcp://*:5557`, `tcp://127.0.0.1:*`) or is ipc/inproc
    and connects otherwise, vLLM's rule. Subscribers filter on `topic`. With `replay_endpoint`,
    a ROUTER socket replays the last `buffer_steps` batches: a request is the first wanted
    sequence number as 8 big-endian bytes (from REQ or DEALER); each reply is
    `(sequence, payload)`, and `(-1, b"")` ends them.

    `publish` may be called from any thread: it only queues; one thread owns the sockets.
    """

    END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)

    def __init__(
        self,
        endpoint: str = "tcp://*:5557",
        *,
        topic: str = "",
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        data_parallel_rank: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._topic = topic.encode()
        self._rank = data_parallel_rank
        self._clock = clock
        self._queue: queue.SimpleQueue[KVEventBatch | None] = queue.SimpleQueue()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._sequence = 0
        self._closed = False
        # Our own context, so that close() can end it and leave no ZMQ thread behind.
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._replay: zmq.Socket[bytes] | None = None
        try:
            self._pub = self._context.socket(zmq.PUB)
            self._pub.set_hwm(hwm)
            # On close, give queued batches a moment to leave rather than waiting forever.
            self._pub.linger = 1000
            self._pub_endpoint = _bind_or_connect(self._pub, endpoint)
            if replay_endpoint is not None:
                self._replay = self._context.socket(zmq.ROUTER)
                self._replay.linger = 0
                self._replay.bind(replay_endpoint)
        except zmq.ZMQError:
            self._context.destroy(linger=0)
            raise
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """The PUB endpoint as bound or connected, with the port a wildcard chose."""
        return self._pub_endpoint

    @property
    def replay_endpoint(self) -> str | None:
        if self._replay is None:
            return None
        return str(self._replay.getsockopt_string(zmq.LAST_ENDPOINT))

    def publish(self, events: Sequence[KVEvent]) -> None:
        """Queues one batch of `events`, stamped now; no events, no batch (as vLLM)."""
        if self._closed:
            raise RuntimeError("the KV event publisher is closed")
        if events:
            self._queue.put(
                KVEventBatch(ts=self._clock(), events=list(events), data_parallel_rank=self._rank)
            )

    def close(self, timeout: float = 5.0) -> None:
        """Sends what is queued, then closes the sockets; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the KV event thread did not stop within %.1f s", timeout)
            return  # it still owns the sockets; the daemon thread dies with the process
        self._context.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self) -> None:
        # Without replay nothing else needs the thread, so it sleeps until a batch comes.
        wait = 0.05 if self._replay is not None else None
        try:
            while True:
                if self._replay is not None and self._replay.poll(0):
                    self._serve_replay(self._replay)
                try:
                    batch = self._queue.get(timeout=wait)
                except queue.Empty:
                    continue
                if batch is None:
                    return
                payload = encode_batch(batch)
                sequence = self._sequence
                self._sequence += 1
                self._pub.send_multipart((self._topic, sequence.to_bytes(8, "big"), payload))
                self._buffer.append((sequence, payload))
        except Exception:
            logger.exception("the KV event thread failed; no more KV events will be sent")
        finally:
            self._pub.close()
            if self._replay is not None:
                self._replay.close()

    def _serve_replay(self, replay: zmq.Socket[bytes]) -> None:
        frames = replay.recv_multipart()
        # ROUTER prepends the peer's identity; a REQ peer adds an empty delimiter.
        envelope: tuple[bytes, ...]
        if len(frames) == 3 and frames[1] == b"":
            envelope = (frames[0], b"")
        elif len(frames) == 2:
            envelope = (frames[0],)
        else:
            logger.warning("ignoring a malformed KV event replay request (%d frames)", len(frames))
            return
        request = frames[-1]
        if len(request) != 8:
            logger.warning("ignoring a KV event replay request of %d bytes", len(request))
            return
        start = int.from_bytes(request, "big")
        for sequence, payload in self._buffer:
            if sequence >= start:
                replay.send_multipart((*envelope, sequence.to_bytes(8, "big"), payload))
        replay.send_multipart((*envelope, self.END_OF_REPLAY, b""))


def _bind_or_connect(socket: zmq.Socket[bytes], endpoint: str) -> str:
    if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
        socket.bind(endpoint)
        return str(socket.getsockopt_string(zmq.LAST_ENDPOINT))
    socket.connect(endpoint)
    return endpoint


@dataclass
class KVEvents:
    """A worker's KV events: what its context holds, published after each generation."""

    tracker: KVBlockTracker
    publisher: ZmqEventPublisher

    def after_generation(self, tokens: Sequence[int]) -> None:
        self.publisher.publish(self.tracker.update(tokens))
