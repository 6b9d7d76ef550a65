"""Block hashes: vLLM's sha256_cbor chain over full blocks, and the 64-bit form events carry."""

import hashlib
import struct

import cbor2
import pytest

from edgellm.kvcache import BlockHash, block_hashes, external_hash, none_hash

# Sixteen tokens spanning every CBOR integer width a 128k vocabulary reaches.
TOKENS = [128000, 128006, 9125, 128007, 271, 0, 1, 2, 42, 127, 128, 255, 256, 65535, 65536, 100000]
SEED = "0"


def _uint(value: int) -> bytes:
    """A CBOR unsigned int, shortest form (RFC 8949 section 3.1), written out by hand."""
    if value < 24:
        return bytes([value])
    for marker, form in ((0x18, ">B"), (0x19, ">H"), (0x1A, ">I"), (0x1B, ">Q")):
        if value < 1 << (8 * struct.calcsize(form)):
            return bytes([marker]) + struct.pack(form, value)
    raise ValueError(value)


def _hand_cbor_key(parent: bytes, tokens: list[int]) -> bytes:
    """CBOR of (parent, tuple(tokens), None): a 3-array, a 32-byte string, an n-array, null."""
    assert len(parent) == 32
    assert len(tokens) < 24
    return (
        b"\x83"
        + b"\x58\x20"
        + parent
        + bytes([0x80 + len(tokens)])
        + b"".join(_uint(t) for t in tokens)
        + b"\xf6"
    )


def test_the_first_block_hash_is_sha256_of_canonical_cbor_as_vllm_computes_it() -> None:
    root = hashlib.sha256(cbor2.dumps(SEED, canonical=True)).digest()
    expected = hashlib.sha256(cbor2.dumps((root, tuple(TOKENS), None), canonical=True)).digest()
    assert none_hash(SEED) == root
    assert block_hashes(TOKENS, seed=SEED) == [expected]


def test_the_cbor_written_by_hand_gives_the_same_hash() -> None:
    root = hashlib.sha256(b"\x61" + SEED.encode()).digest()  # text string of length 1
    key = _hand_cbor_key(root, TOKENS)
    assert key == cbor2.dumps((root, tuple(TOKENS), None), canonical=True)
    assert block_hashes(TOKENS, seed=SEED) == [hashlib.sha256(key).digest()]


def test_golden_values_do_not_drift() -> None:
    assert none_hash(SEED).hex() == (
        "4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e"
    )
    (first,) = block_hashes(TOKENS, seed=SEED)
    assert first.hex() == "897cbb1083660fae483ce8eb96780d850ac3daedf4c606b2185e35fa43792955"
    assert external_hash(first) == 1755900253711182165


def test_each_block_chains_on_the_one_before() -> None:
    tokens = TOKENS + list(range(16))
    first, second = block_hashes(tokens, seed=SEED)
    key = _hand_cbor_key(first, list(range(16)))
    assert second == hashlib.sha256(key).digest()


def test_only_full_blocks_are_hashed() -> None:
    assert block_hashes(TOKENS[:15], seed=SEED) == []
    assert len(block_hashes(list(range(47)), seed=SEED)) == 2
    assert len(block_hashes(list(range(48)), seed=SEED)) == 3
    assert len(block_hashes(list(range(10)), block_size=4, seed=SEED)) == 2


def test_a_prefix_has_the_same_hashes_as_the_start_of_a_longer_sequence() -> None:
    long = list(range(100))
    assert block_hashes(long[:64], seed=SEED) == block_hashes(long, seed=SEED)[:4]


def test_hashing_can_resume_from_a_parent() -> None:
    tokens = list(range(64))
    whole = block_hashes(tokens, seed=SEED)
    assert block_hashes(tokens[32:], parent=whole[1], seed=SEED) == whole[2:]


def test_a_changed_token_changes_its_block_and_every_later_one() -> None:
    tokens = list(range(64))
    changed = [*tokens]
    changed[20] = 9999  # in the second block
    before, after = block_hashes(tokens, seed=SEED), block_hashes(changed, seed=SEED)
    assert before[0] == after[0]
    assert all(b != a for b, a in zip(before[1:], after[1:], strict=True))


def test_workers_agree_only_when_their_seeds_agree() -> None:
    assert block_hashes(TOKENS, seed="1") != block_hashes(TOKENS, seed=SEED)
    assert block_hashes(TOKENS, seed=SEED) == block_hashes(list(TOKENS), seed=SEED)


def test_without_a_seed_the_root_is_vllms_fixed_default() -> None:
    assert none_hash(None) == none_hash("vllm-none-hash")
    assert none_hash(None) != none_hash(SEED)


def test_extra_keys_are_mixed_in_per_block() -> None:
    tokens = list(range(32))
    plain = block_hashes(tokens, seed=SEED)
    salted = block_hashes(tokens, extra_keys=[("tenant-a",), None], seed=SEED)
    assert salted[0] != plain[0]
    root = none_hash(SEED)
    key = cbor2.dumps((root, tuple(range(16)), ("tenant-a",)), canonical=True)
    assert salted[0] == hashlib.sha256(key).digest()
    # A list hashes as a tuple does (both are CBOR arrays), so keys decoded from events work.
    assert block_hashes(tokens, extra_keys=[["tenant-a"], None], seed=SEED) == salted  # type: ignore[list-item]


def test_extra_keys_must_cover_each_full_block() -> None:
    with pytest.raises(ValueError, match="2 full blocks"):
        block_hashes(list(range(32)), extra_keys=[None], seed=SEED)


def test_the_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        block_hashes(TOKENS, block_size=0, seed=SEED)


def test_events_carry_the_low_64_bits_big_endian() -> None:
    digest = BlockHash(bytes(range(32)))
    assert external_hash(digest) == int.from_bytes(bytes(range(24, 32)), "big")
    assert external_hash(bytes(24) + (1).to_bytes(8, "big")) == 1
    assert external_hash(12345) == 12345
    assert external_hash(-1) == (1 << 64) - 1
