"""KV events: vLLM's bytes, the llama.cpp tracker's diffs, and a real ZMQ round trip."""

import time
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq

from edgellm.kvcache import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventDecodeError,
    KVEvent,
    KVEventBatch,
    block_hashes,
    decode_batch,
    encode_batch,
    external_hash,
)
from edgellm.worker.kvevents import KVBlockTracker, ZmqEventPublisher

SEED = "0"

# --- The oracle: structs declared as vLLM declares them (vllm/distributed/kv_events.py,
# main, June 2026: events are maps since vLLM #42892, the batch stays positional). Left out:
# the __hash__ methods vLLM adds for its aggregator, which play no part in encoding.


class VllmEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class VllmKVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class VllmBlockStored(VllmKVCacheEvent, tag="BlockStored"):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class VllmBlockRemoved(VllmKVCacheEvent, tag="BlockRemoved"):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None


class VllmAllBlocksCleared(VllmKVCacheEvent, tag="AllBlocksCleared"):
    pass


class VllmKVEventBatch(VllmEventBatch):
    events: list[VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared]


# vLLM before #42892 (here v0.10's fields): every event a positional array too.
class LegacyEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class LegacyBlockStored(LegacyEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class LegacyBlockRemoved(LegacyEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


class LegacyAllBlocksCleared(LegacyEvent, tag="AllBlocksCleared"):
    pass


HASHES = [external_hash(h) for h in block_hashes(list(range(32)), seed=SEED)]
# Token ids of every msgpack integer width: fixint, uint8, uint16, uint32.
TOKENS = [128000, 128006, 9125, 128007, 271, 0, 1, 2, 42, 127, 128, 255, 256, 65535, 65536, 9]


def _stored(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "block_hashes": HASHES,
        "parent_block_hash": None,
        "token_ids": TOKENS * 2,
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None, None],
    }
    return {**fields, **overrides}


# --- The schema


def test_a_block_stored_batch_encodes_to_vllms_exact_bytes() -> None:
    ours = KVEventBatch(ts=1757500000.25, events=[BlockStored(**_stored())], data_parallel_rank=0)
    theirs = VllmKVEventBatch(
        ts=1757500000.25, events=[VllmBlockStored(**_stored())], data_parallel_rank=0
    )
    assert encode_batch(ours) == msgspec.msgpack.encode(theirs)


def test_every_event_kind_and_field_encodes_as_vllm_encodes_it() -> None:
    stored = _stored(
        block_hashes=[HASHES[1]],
        parent_block_hash=HASHES[0],
        token_ids=TOKENS,
        lora_id=3,
        medium=MEDIUM_CPU,
        lora_name="adapter",
        extra_keys=[("adapter", "salt")],
        group_idx=1,
        kv_cache_spec_kind="sliding_window",
        kv_cache_spec_sliding_window=4096,
    )
    removed: dict[str, Any] = {"block_hashes": HASHES, "medium": MEDIUM_CPU, "group_idx": 1}
    ours = KVEventBatch(
        ts=2.5,
        events=[BlockStored(**stored), BlockRemoved(**removed), AllBlocksCleared()],
    )
    theirs = VllmKVEventBatch(
        ts=2.5,
        events=[VllmBlockStored(**stored), VllmBlockRemoved(**removed), VllmAllBlocksCleared()],
    )
    assert encode_batch(ours) == msgspec.msgpack.encode(theirs)


def test_a_batch_round_trips_and_vllm_reads_ours() -> None:
    batch = KVEventBatch(
        ts=3.0,
        events=[
            BlockStored(**_stored(extra_keys=[("salt",), None])),
            BlockRemoved(block_hashes=HASHES, medium="GPU"),
            AllBlocksCleared(),
        ],
        data_parallel_rank=0,
    )
    payload = encode_batch(batch)
    assert decode_batch(payload) == batch
    theirs = msgspec.msgpack.decode(payload, type=VllmKVEventBatch)
    assert isinstance(theirs.events[0], VllmBlockStored)
    assert theirs.events[0].block_hashes == HASHES
    assert isinstance(theirs.events[2], VllmAllBlocksCleared)


def test_the_batch_is_positional_and_events_are_maps_tagged_by_type() -> None:
    payload = encode_batch(
        KVEventBatch(ts=1.0, events=[BlockRemoved(block_hashes=[7], medium=None)])
    )
    # An event leaves out fields at their default (group_idx); medium has no default, so its
    # None is sent. msgspec leaves nothing out of a positional struct: the rank is sent as nil.
    assert msgspec.msgpack.decode(payload) == [
        1.0,
        [{"type": "BlockRemoved", "block_hashes": [7], "medium": None}],
        None,
    ]


def test_raw_digest_hashes_round_trip() -> None:
    digest = bytes(range(32))
    batch = KVEventBatch(
        ts=1.0, events=[BlockStored(**_stored(block_hashes=[digest], parent_block_hash=digest))]
    )
    decoded = decode_batch(encode_batch(batch))
    assert decoded == batch
    (event,) = decoded.events
    assert isinstance(event, BlockStored)
    assert external_hash(event.block_hashes[0]) == external_hash(digest)


def test_events_from_vllm_before_map_encoding_are_read() -> None:
    legacy = VllmEventBatch(
        ts=4.0,
        events=[
            LegacyBlockStored(list(HASHES), None, TOKENS * 2, 16, None, "GPU"),
            LegacyBlockRemoved(list(HASHES[:1]), "GPU"),
            LegacyAllBlocksCleared(),
        ],
    )
    decoded = decode_batch(msgspec.msgpack.encode(legacy))
    assert decoded == KVEventBatch(
        ts=4.0,
        events=[
            BlockStored(**_stored(extra_keys=None)),
            BlockRemoved(block_hashes=HASHES[:1], medium="GPU"),
            AllBlocksCleared(),
        ],
    )


def test_fields_newer_than_ours_are_ignored() -> None:
    newer = [1.0, [{**_stored(), "type": "BlockStored", "locality": "LOCAL"}], 0]
    (event,) = decode_batch(msgspec.msgpack.encode(newer)).events
    assert event == BlockStored(**_stored())


def test_a_payload_that_is_no_batch_is_refused() -> None:
    with pytest.raises(EventDecodeError):
        decode_batch(msgspec.msgpack.encode({"ts": 1.0}))
    with pytest.raises(EventDecodeError):
        decode_batch(b"\xc1")


# --- The tracker


def _full(count: int, start: int = 0) -> list[int]:
    return list(range(start, start + count))


def test_the_first_generation_stores_its_full_blocks() -> None:
    tracker = KVBlockTracker(SEED)
    tokens = _full(40)
    (event,) = tracker.update(tokens)
    expected = [external_hash(h) for h in block_hashes(tokens, seed=SEED)]
    assert event == BlockStored(
        block_hashes=expected,
        parent_block_hash=None,
        token_ids=tokens[:32],
        block_size=16,
        lora_id=None,
        medium=MEDIUM_GPU,
        lora_name=None,
        extra_keys=[None, None],
    )
    assert tracker.blocks == expected


def test_a_kept_prefix_stores_only_the_new_blocks_chained_on_it() -> None:
    tracker = KVBlockTracker(SEED)
    tracker.update(_full(40))
    (event,) = tracker.update(_full(70))
    whole = [external_hash(h) for h in block_hashes(_full(70), seed=SEED)]
    assert isinstance(event, BlockStored)
    assert event.block_hashes == whole[2:]
    assert event.parent_block_hash == whole[1]
    assert event.token_ids == _full(64)[32:]
    assert tracker.blocks == whole


def test_tokens_that_fill_no_new_block_change_nothing() -> None:
    tracker = KVBlockTracker(SEED)
    tracker.update(_full(33))
    assert tracker.update(_full(47)) == []
    assert tracker.update(_full(47)) == []


def test_a_divergence_removes_the_tail_and_stores_the_new_one() -> None:
    tracker = KVBlockTracker(SEED)
    tracker.update(_full(64))
    before = tracker.blocks
    changed = [*_full(20), *_full(30, start=1000)]  # differs from the second block on
    removed, stored = tracker.update(changed)
    assert removed == BlockRemoved(block_hashes=before[1:], medium=MEDIUM_GPU)
    assert isinstance(stored, BlockStored)
    assert stored.parent_block_hash == before[0]
    assert stored.token_ids == changed[16:48]
    assert tracker.blocks == [external_hash(h) for h in block_hashes(changed, seed=SEED)]


def test_a_shorter_context_removes_only_the_blocks_it_lost() -> None:
    tracker = KVBlockTracker(SEED)
    tracker.update(_full(64))
    before = tracker.blocks
    assert tracker.update(_full(40)) == [BlockRemoved(block_hashes=before[2:], medium=MEDIUM_GPU)]
    assert tracker.blocks == before[:2]


def test_clear_forgets_every_block() -> None:
    tracker = KVBlockTracker(SEED)
    tracker.update(_full(40))
    assert tracker.clear() == AllBlocksCleared()
    assert tracker.blocks == []
    (event,) = tracker.update(_full(40))
    assert isinstance(event, BlockStored)
    assert event.parent_block_hash is None


def test_the_tracker_takes_llama_cpp_numpy_tokens_and_its_block_size() -> None:
    tracker = KVBlockTracker(SEED, block_size=4, medium="GPU")
    (event,) = tracker.update(np.arange(10, dtype=np.intc))  # type: ignore[arg-type]
    assert isinstance(event, BlockStored)
    assert event.token_ids == _full(8)
    assert event.medium == "GPU"
    assert event.block_hashes == [
        external_hash(h) for h in block_hashes(_full(8), block_size=4, seed=SEED)
    ]
    encode_batch(KVEventBatch(ts=0.0, events=[event]))  # plain ints, so it encodes


def test_the_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        KVBlockTracker(SEED, block_size=0)


# --- The publisher, over real ZMQ sockets on loopback


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def _receive_while_publishing(
    publisher: ZmqEventPublisher, sub: zmq.Socket[bytes], events: list[KVEvent]
) -> list[bytes]:
    """A SUB misses what is sent before its subscription arrives (ZMQ's slow joiner), so
    publish until one batch gets through."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        publisher.publish(events)
        if sub.poll(50):
            return sub.recv_multipart()
    raise AssertionError("no KV event batch arrived within 10 s")


def test_batches_reach_a_subscriber_in_vllms_frames(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    events: list[KVEvent] = [BlockStored(**_stored())]
    marker: list[KVEvent] = [AllBlocksCleared()]
    with ZmqEventPublisher("tcp://127.0.0.1:*", topic="kv-events", clock=lambda: 12.5) as pub:
        sub = context.socket(zmq.SUB)
        sub.connect(pub.endpoint)
        sub.subscribe(b"kv-events")
        topic, sequence, payload = _receive_while_publishing(pub, sub, events)
        assert topic == b"kv-events"
        assert len(sequence) == 8
        assert decode_batch(payload) == KVEventBatch(ts=12.5, events=events, data_parallel_rank=0)
        # Once subscribed, nothing is lost and sequence numbers count up by one.
        pub.publish(marker)
        last = int.from_bytes(sequence, "big")
        while True:
            assert sub.poll(10_000), "the marker batch did not arrive"
            _, sequence, payload = sub.recv_multipart()
            assert int.from_bytes(sequence, "big") == last + 1
            last += 1
            if decode_batch(payload).events == marker:
                break
    assert pub.endpoint.startswith("tcp://127.0.0.1:")


def test_missed_batches_are_replayed_from_the_requested_sequence(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    batches: list[list[KVEvent]] = [
        [BlockRemoved(block_hashes=[n], medium=MEDIUM_CPU)] for n in range(3)
    ]
    with ZmqEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as pub:
        for events in batches:
            pub.publish(events)
        assert pub.replay_endpoint is not None
        dealer = context.socket(zmq.DEALER)
        dealer.connect(pub.replay_endpoint)
        # The publisher's thread may not have sent all three yet: ask until it has.
        deadline = time.monotonic() + 10
        replayed: list[tuple[int, KVEventBatch]] = []
        while len(replayed) < 2:
            assert time.monotonic() < deadline, "the replay never held the batches"
            dealer.send((1).to_bytes(8, "big"))
            replayed = []
            while True:
                assert dealer.poll(10_000), "the replay did not end"
                sequence, payload = dealer.recv_multipart()
                if sequence == ZmqEventPublisher.END_OF_REPLAY:
                    assert payload == b""
                    break
                replayed.append((int.from_bytes(sequence, "big"), decode_batch(payload)))
        assert [s for s, _ in replayed] == [1, 2]
        assert [b.events for _, b in replayed] == batches[1:]


def test_a_closed_publisher_stops_its_thread_and_refuses_batches() -> None:
    pub = ZmqEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
    pub.publish([AllBlocksCleared()])
    pub.close()
    pub.close()
    assert not pub._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        pub.publish([AllBlocksCleared()])


def test_an_unusable_endpoint_fails_at_once() -> None:
    with pytest.raises(zmq.ZMQError):
        ZmqEventPublisher("bogus://*:1")
