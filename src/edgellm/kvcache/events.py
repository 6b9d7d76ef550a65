"""KV-cache events in vLLM's wire schema, so one KV index reads vLLM and llama.cpp workers alike.

The llama.cpp worker publishes these (`edgellm.worker.kvevents`); the router's KV index decodes
what every worker publishes. The structs carry vLLM's names, field order and msgspec options, so
their msgpack bytes are vLLM's bytes: a batch is a positional array `[ts, events, dp_rank]`, each
event a map tagged by `"type"` that leaves out each field still at its default.

Read from vLLM main (June 2026): `vllm/distributed/kv_events.py` at 0181ea3173e5 and the
structs where `ZmqEventPublisher` emits them (`vllm/v1/core/block_pool.py`). vLLM PR #42892
made events maps (before, each event was a positional array too; `decode_batch` still reads
those). That commit's copy also drops `array_like` from the batch, but vLLM 0.26's real streams,
later vLLM copies and the consumers fixed for #42892 (llm-d-kv-cache #661, kthena #1549) keep
the batch positional, and so do we. Fields newer than `kv_cache_spec_sliding_window` (vLLM has
since added some, such as `locality`) are ignored when decoding and never sent.
"""

from collections.abc import Sequence
from typing import Any

import msgspec

# vLLM's media name tiers, not chips: "GPU" is the engine's own KV pool, which attention reads
# where it is (vLLM's BlockPool always says "GPU", on CPU platforms too), and so is a llama.cpp
# context's KV in RAM; "CPU" is the tier vLLM offloads to (its offloading connector), which a
# request can use only after a copy back, and which consumers credit less (vllm-router 0.8).
MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
# Not vLLM's: a peer's IPFS store holds the blocks (edgellm.worker.ipfskv), to load, not use.
MEDIUM_IPFS = "IPFS"

# The topic of every frame, vLLM's default (KVEventsConfig.topic): stock consumers subscribe to
# it, and some take only frames whose topic is exactly theirs (vllm-router 0.1.17's static KV
# event sources, which always subscribe to this one).
DEFAULT_TOPIC = ""

# A block's hash on the wire: an int (see hashing.external_hash), or the raw digest from a vLLM
# worker run with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0.
WireHash = int | bytes


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True, frozen=True):
    """Base of the events; the tag is the class name, as in vLLM. Frozen (which vLLM's are not,
    and which does not change the bytes) is restated on each subclass for mypy."""


class BlockStored(KVCacheEvent, frozen=True):
    """Full blocks became cached: one chain, `parent_block_hash` is the block before the first."""

    block_hashes: Sequence[WireHash]  # a list when decoded
    parent_block_hash: WireHash | None
    token_ids: list[int]
    block_size: int
    # No defaults: vLLM always sends these three, None or not.
    lora_id: int | None  # deprecated in vLLM in favour of lora_name
    medium: str | None
    lora_name: str | None
    # One entry per block: the extra keys its hash mixed in (see hashing.block_hashes).
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None  # the KV-cache group of hybrid models
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent, frozen=True):
    block_hashes: Sequence[WireHash]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent, frozen=True):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    ts: float  # seconds since the epoch
    events: list[KVEvent]
    # vLLM's publisher fills in its data-parallel rank (0 without data parallelism).
    data_parallel_rank: int | None = None


class EventDecodeError(ValueError):
    """A payload is not a KV event batch in any schema vLLM has published."""


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _ENCODER.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Reads current vLLM batches and those of vLLM before #42892 (positional events)."""
    try:
        return _DECODER.decode(payload)
    except msgspec.DecodeError as error:
        try:
            legacy = _LEGACY_DECODER.decode(payload)
        except msgspec.DecodeError:
            raise EventDecodeError(f"not a KV event batch: {error}") from error
    return KVEventBatch(
        ts=legacy.ts,
        events=[_from_legacy(event) for event in legacy.events],
        data_parallel_rank=legacy.data_parallel_rank,
    )


# Before #42892 events were positional arrays; older vLLM sent fewer trailing fields, which the
# defaults fill, and msgspec ignores trailing fields newer than these.
class _LegacyBlockStored(msgspec.Struct, array_like=True, tag="BlockStored"):
    block_hashes: Sequence[WireHash]
    parent_block_hash: WireHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class _LegacyBlockRemoved(msgspec.Struct, array_like=True, tag="BlockRemoved"):
    block_hashes: Sequence[WireHash]
    medium: str | None = None
    group_idx: int | None = None


class _LegacyAllBlocksCleared(msgspec.Struct, array_like=True, tag="AllBlocksCleared"):
    pass


class _LegacyBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_LegacyBlockStored | _LegacyBlockRemoved | _LegacyAllBlocksCleared]
    data_parallel_rank: int | None = None


_LEGACY_DECODER = msgspec.msgpack.Decoder(_LegacyBatch)


def _from_legacy(
    event: _LegacyBlockStored | _LegacyBlockRemoved | _LegacyAllBlocksCleared,
) -> KVEvent:
    if isinstance(event, _LegacyBlockStored):
        return BlockStored(**msgspec.structs.asdict(event))
    if isinstance(event, _LegacyBlockRemoved):
        return BlockRemoved(**msgspec.structs.asdict(event))
    return AllBlocksCleared()
