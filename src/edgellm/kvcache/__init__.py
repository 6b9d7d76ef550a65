"""KV-cache naming shared by every worker and the router: vLLM's chained block hashes and its
KV event schema, so llama.cpp and vLLM workers feed one KV index. Imports only `edgellm.api`.
"""

from edgellm.kvcache.events import (
    DEFAULT_TOPIC,
    MEDIUM_CPU,
    MEDIUM_GPU,
    MEDIUM_IPFS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventDecodeError,
    KVCacheEvent,
    KVEvent,
    KVEventBatch,
    WireHash,
    decode_batch,
    encode_batch,
)
from edgellm.kvcache.hashing import (
    DEFAULT_BLOCK_SIZE,
    BlockHash,
    ExternalBlockHash,
    block_hashes,
    external_hash,
    none_hash,
    prompt_block_keys,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_TOPIC",
    "MEDIUM_CPU",
    "MEDIUM_GPU",
    "MEDIUM_IPFS",
    "AllBlocksCleared",
    "BlockHash",
    "BlockRemoved",
    "BlockStored",
    "EventDecodeError",
    "ExternalBlockHash",
    "KVCacheEvent",
    "KVEvent",
    "KVEventBatch",
    "WireHash",
    "block_hashes",
    "decode_batch",
    "encode_batch",
    "external_hash",
    "none_hash",
    "prompt_block_keys",
]
