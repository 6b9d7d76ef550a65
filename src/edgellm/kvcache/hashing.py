"""vLLM's prefix-cache block hashes, computed exactly as vLLM computes them.

A KV block is named by a hash chained over every block before it, so a llama.cpp worker and
vLLM workers that hold the same prefix publish the same names and feed one KV index. The
llama.cpp worker's `KVBlockTracker` hashes what its context holds; the router's KV index hashes
prompts to look them up.

Read from vLLM main (June 2026): `vllm/v1/core/kv_cache_utils.py` at 001cabc1be16
(`hash_block_tokens`, `init_none_hash`, `maybe_convert_block_hash`) and `sha256_cbor` in
`vllm/utils/hashing.py`. A vLLM worker agrees with these hashes when it runs with
`--prefix-caching-hash-algo sha256_cbor`, `--block-size` equal to ours and `PYTHONHASHSEED` set
to our seed; its default `sha256` pickles the key instead, which only Python can reproduce.
"""

import hashlib
from collections.abc import Sequence
from typing import Any, NewType

import cbor2

# The 32-byte sha256 digest vLLM keeps per full block.
BlockHash = NewType("BlockHash", bytes)
# What KV events carry (vLLM's VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES, on by default): the digest's
# low 64 bits as an unsigned int.
ExternalBlockHash = NewType("ExternalBlockHash", int)

DEFAULT_BLOCK_SIZE = 16  # vLLM's default --block-size on GPUs
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"  # vLLM's seed when PYTHONHASHSEED is unset
_LOW_64_BITS = (1 << 64) - 1


def _sha256_cbor(value: object) -> bytes:
    # Canonical CBOR is language-neutral: a Go or Rust index can recompute these hashes.
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


def none_hash(seed: str | None) -> BlockHash:
    """The parent hash of every sequence's first block: the hash of vLLM's `PYTHONHASHSEED`
    string, or, unset, of its fixed default seed (vllm 0.33.0, for sha256 and sha256_cbor)."""
    return BlockHash(_sha256_cbor(DEFAULT_NONE_HASH_SEED if seed is None else seed))


def block_hashes(
    tokens: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    parent: BlockHash | None = None,
    extra_keys: Sequence[tuple[Any, ...] | None] | None = None,
    *,
    seed: str,
) -> list[BlockHash]:
    """The chained hashes of the full blocks of `tokens`; a partial last block has none.

    Each is sha256 of canonical CBOR of `(parent hash, tuple of the block's tokens, extra keys)`.
    `parent` is the hash of the block before `tokens[0]`, None at the start of a sequence (then
    the seed's `none_hash`). `extra_keys`, one entry per full block, are what vLLM mixes in for
    LoRA names, multimodal inputs and cache salts; None for plain text.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, not {block_size}")
    count = len(tokens) // block_size
    if extra_keys is not None and len(extra_keys) != count:
        raise ValueError(f"extra_keys has {len(extra_keys)} entries for {count} full blocks")
    # vLLM replaces any falsy parent, so an empty digest starts a sequence too.
    previous = parent or none_hash(seed)
    hashes: list[BlockHash] = []
    for index in range(count):
        block = tuple(tokens[index * block_size : (index + 1) * block_size])
        keys = extra_keys[index] if extra_keys is not None else None
        previous = BlockHash(_sha256_cbor((previous, block, keys)))
        hashes.append(previous)
    return hashes


def external_hash(block_hash: bytes | int) -> ExternalBlockHash:
    """The int a KV event carries for a block: the digest's low 64 bits, big-endian.

    Ints pass through (a signed 64-bit one as its unsigned twin), so events from vLLM workers
    that send raw digests (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0) map to the same keys.
    """
    if isinstance(block_hash, int):
        return ExternalBlockHash(block_hash & _LOW_64_BITS)
    return ExternalBlockHash(int.from_bytes(block_hash, "big") & _LOW_64_BITS)


def prompt_block_keys(
    tokens: Sequence[int], *, seed: str, block_size: int = DEFAULT_BLOCK_SIZE
) -> list[ExternalBlockHash]:
    """A prompt's full blocks as KV events name them: what a KV index is asked about."""
    return [external_hash(h) for h in block_hashes(tokens, block_size, seed=seed)]
