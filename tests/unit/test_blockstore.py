"""The IPFS block store's pure parts: CIDs, block splitting, manifests, signed announcements
and LRU pin accounting. The store against real Kubo daemons is in tests/e2e/test_ipfs.py."""

import hashlib

import dag_cbor
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from multiformats import CID

from edgellm.kvcache import block_hashes, external_hash
from edgellm.kvcache.blockstore import (
    MAX_BLOCK_SIZE,
    Announcement,
    BadAnnouncementError,
    BadManifestError,
    ChunkManifest,
    ChunkTooLargeError,
    CorruptBlockError,
    KVChunk,
    PinLedger,
    announce,
    block_cid,
    split_blocks,
    verify_announcement,
    verify_block,
)

MiB = 1 << 20
TOKEN_HASHES = tuple(external_hash(h) for h in block_hashes(list(range(48)), seed="0"))
CHUNK = KVChunk(
    model="tiny-random",
    token_hashes=TOKEN_HASHES,
    dtype="float16",
    shape=(2, 2, 48, 4, 8),
    layout="layers,kv,tokens,heads,head_dim",
    data=bytes(range(256)) * 24,
)


def _manifest(chunk: KVChunk = CHUNK) -> ChunkManifest:
    return ChunkManifest.of(chunk, [block_cid(b) for b in split_blocks(chunk.data)])


# --- content addressing ----------------------------------------------------------------------


def test_a_raw_block_cid_is_the_one_kubo_gives_for_the_same_bytes() -> None:
    # `echo -n hello | ipfs block put`: CIDv1, raw codec 0x55, sha2-256, base32.
    assert str(block_cid(b"hello")) == "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"


def test_a_cid_carries_the_sha2_256_of_its_bytes() -> None:
    cid = block_cid(b"kv", "dag-cbor")
    assert (cid.version, cid.codec.code, cid.hashfun.name) == (1, 0x71, "sha2-256")
    assert cid.raw_digest == hashlib.sha256(b"kv").digest()


def test_a_block_that_hashes_to_its_cid_passes_and_one_flipped_byte_fails() -> None:
    data = bytes(1000)
    verify_block(block_cid(data), data)
    with pytest.raises(CorruptBlockError, match="hash to something else"):
        verify_block(block_cid(data), b"\x01" + data[1:])


def test_a_chunk_splits_into_full_blocks_and_a_shorter_last_one() -> None:
    data = bytes(5 * MiB // 2)
    blocks = split_blocks(data)
    assert [len(b) for b in blocks] == [MiB, MiB, MiB // 2]
    assert b"".join(blocks) == data
    assert [len(b) for b in split_blocks(bytes(2 * MiB))] == [MiB, MiB]
    assert split_blocks(b"") == []
    assert MiB == MAX_BLOCK_SIZE


# --- manifests -------------------------------------------------------------------------------


def test_a_manifest_round_trips_through_dag_cbor_and_names_itself_by_its_bytes() -> None:
    manifest = _manifest()
    encoded = manifest.encode()
    assert ChunkManifest.decode(encoded) == manifest
    assert manifest.cid == block_cid(encoded, "dag-cbor")
    assert manifest.chunk(CHUNK.data) == CHUNK
    assert dag_cbor.decode(encoded) == {
        "format": "edgellm/kv-chunk@1",
        "model": "tiny-random",
        "tokens": list(TOKEN_HASHES),
        "dtype": "float16",
        "shape": [2, 2, 48, 4, 8],
        "layout": "layers,kv,tokens,heads,head_dim",
        "blocks": list(manifest.blocks),
        "size": len(CHUNK.data),
    }


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"format": "edgellm/kv-chunk@2"}, "format"),
        ({"tokens": [-1]}, "greater than or equal"),
        ({"tokens": ["1"]}, "valid integer"),
        ({"shape": [-1]}, "greater than or equal"),
        ({"blocks": [block_cid(b"x", "dag-cbor")]}, "not a raw one"),
        ({"size": 2 * MiB}, "cannot hold"),
        ({"size": 0}, "cannot hold"),
        ({"extra": 1}, "Extra inputs"),
    ],
)
def test_a_manifest_that_breaks_the_schema_is_refused(
    change: dict[str, object], reason: str
) -> None:
    fields = _manifest().to_ipld() | change
    with pytest.raises(BadManifestError, match=reason):
        ChunkManifest.decode(dag_cbor.encode(fields))


def test_bytes_that_are_not_dag_cbor_are_not_a_manifest() -> None:
    with pytest.raises(BadManifestError, match="not a KV chunk manifest"):
        ChunkManifest.decode(b"\xff\x00")


# --- announcements ---------------------------------------------------------------------------

KEY = Ed25519PrivateKey.generate()
TRUSTED = {"peer-a": KEY.public_key()}
MANIFEST_CID = _manifest().cid


def _announcement(key: Ed25519PrivateKey = KEY, peer: str = "peer-a") -> Announcement:
    return announce(
        key, peer=peer, model="tiny-random", token_hashes=TOKEN_HASHES, manifest=MANIFEST_CID
    )


def test_an_announcement_signed_by_the_peer_verifies_after_the_wire() -> None:
    sent = _announcement()
    received = Announcement.decode(sent.encode())
    assert received == sent
    verify_announcement(received, TRUSTED)


def test_the_signed_bytes_are_canonical_dag_cbor_without_the_signature() -> None:
    announcement = _announcement()
    assert dag_cbor.decode(announcement.signed_bytes()) == {
        "format": "edgellm/kv-announcement@1",
        "peer": "peer-a",
        "model": "tiny-random",
        "tokens": list(TOKEN_HASHES),
        "manifest": MANIFEST_CID,
    }
    assert len(announcement.signature) == 64  # Ed25519


@pytest.mark.parametrize(
    "change",
    [
        {"model": "another-model"},
        {"token_hashes": TOKEN_HASHES[:-1]},
        {"manifest": block_cid(b"another chunk", "dag-cbor")},
        {"signature": bytes(64)},
    ],
)
def test_an_announcement_changed_after_signing_is_rejected(change: dict[str, object]) -> None:
    with pytest.raises(BadAnnouncementError, match="bad signature"):
        verify_announcement(_announcement().model_copy(update=change), TRUSTED)


def test_an_announcement_signed_by_another_key_or_an_unknown_peer_is_rejected() -> None:
    impostor = Ed25519PrivateKey.generate()
    with pytest.raises(BadAnnouncementError, match="bad signature"):
        verify_announcement(_announcement(impostor), TRUSTED)
    with pytest.raises(BadAnnouncementError, match="no trusted key for peer 'peer-x'"):
        verify_announcement(_announcement(impostor, "peer-x"), TRUSTED)


def test_bytes_that_are_not_an_announcement_are_rejected() -> None:
    unsigned = dag_cbor.encode({"peer": "peer-a", "model": "m", "tokens": []})
    for data in (b"\xff", unsigned):
        with pytest.raises(BadAnnouncementError, match="not a KV announcement"):
            Announcement.decode(data)


# --- pin accounting --------------------------------------------------------------------------


def _cids(count: int) -> list[CID]:
    return [block_cid(bytes([i]), "dag-cbor") for i in range(count)]


def test_the_least_recently_used_chunks_are_unpinned_first_to_make_room() -> None:
    a, b, c, d = _cids(4)
    ledger = PinLedger(cap_bytes=300)
    assert ledger.touch(a, 100) == []
    assert ledger.touch(b, 100) == []
    assert ledger.touch(c, 100) == []
    assert ledger.touch(a, 100) == []  # used again: now the most recent
    assert ledger.touch(d, 150) == [b, c]
    assert ledger.chunks() == [a, d]
    assert ledger.pinned_bytes == 250


def test_a_chunk_larger_than_the_cap_is_refused_and_forgetting_frees_its_bytes() -> None:
    a, b = _cids(2)
    ledger = PinLedger(cap_bytes=100)
    with pytest.raises(ChunkTooLargeError, match="exceeds the 100-byte cap"):
        ledger.touch(a, 101)
    ledger.touch(b, 100)
    ledger.forget(b)
    assert (len(ledger), ledger.pinned_bytes, b in ledger) == (0, 0, False)


@given(st.lists(st.tuples(st.integers(0, 9), st.integers(1, 100)), max_size=60))
def test_pinned_bytes_never_exceed_the_cap_and_the_newest_chunk_stays(
    uses: list[tuple[int, int]],
) -> None:
    cids, sizes = _cids(10), dict[int, int]()
    ledger = PinLedger(cap_bytes=250)
    for index, size in uses:
        size = sizes.setdefault(index, size)  # a chunk's size never changes
        evicted = ledger.touch(cids[index], size)
        assert cids[index] not in evicted
        assert ledger.chunks()[-1] == cids[index]
        assert ledger.pinned_bytes <= 250
        assert not set(evicted) & set(ledger.chunks())
