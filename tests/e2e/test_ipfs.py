"""Kubo's RPC through EdgeLLM's client, and KV chunks through the IPFS block store, on three real
Kubo daemons in a private swarm on loopback (hack/tools.sh builds the pinned `ipfs`)."""

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import dag_cbor
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dag_cbor.ipld import IPLDKind
from multiformats import CID

from edgellm.dev.ipfs import LocalSwarm
from edgellm.kvcache import block_hashes, external_hash
from edgellm.kvcache.blockstore import (
    MAX_BLOCK_SIZE,
    Announcement,
    BadAnnouncementError,
    BadManifestError,
    ChunkManifest,
    ChunkTooLargeError,
    CorruptBlockError,
    KVBlockStore,
    KVChunk,
    announce,
    block_cid,
    verify_announcement,
)
from edgellm.kvcache.ipfs import (
    IPFSCommandError,
    IPFSNotFoundError,
    IPFSUnavailableError,
    KuboClient,
)

pytestmark = pytest.mark.anyio
MiB = 1 << 20


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("ipfs"), 3) as swarm:
        yield swarm


def chunk(size: int) -> KVChunk:
    """A chunk of fresh random bytes, so no two tests share blocks on the shared daemons."""
    token_ids = list(os.urandom(64))  # four blocks of 16 tokens
    return KVChunk(
        model="tiny-random",
        token_hashes=tuple(external_hash(h) for h in block_hashes(token_ids, seed="0")),
        dtype="float16",
        shape=(size // 2,),
        layout="flat",
        data=os.urandom(size),
    )


# --- the client against one daemon -------------------------------------------------------------


async def test_a_block_put_is_read_back_and_its_cid_is_the_one_computed_locally(
    swarm: LocalSwarm,
) -> None:
    data = os.urandom(4096)
    async with KuboClient(swarm.nodes[0].api_url) as ipfs:
        stored = await ipfs.block_put(data)
        assert stored.cid == block_cid(data)
        assert str(stored.cid).startswith("bafkrei")  # CIDv1, raw, sha2-256, base32
        assert stored.size == len(data)
        assert await ipfs.block_get(stored.cid) == data
        assert (await ipfs.block_stat(stored.cid, offline=True)).size == len(data)


async def test_a_file_added_is_read_back_with_cat(swarm: LocalSwarm) -> None:
    data = os.urandom(300_000)  # more than one UnixFS chunk
    async with KuboClient(swarm.nodes[0].api_url) as ipfs:
        added = await ipfs.add(data, name="weights.bin")
        assert added.name == "weights.bin"
        assert added.cid.version == 1
        assert await ipfs.cat(added.cid) == data


async def test_a_dag_cbor_node_round_trips_and_kubo_names_it_as_we_do(swarm: LocalSwarm) -> None:
    link = block_cid(b"linked")
    node: dict[str, IPLDKind] = {
        "model": "tiny",
        "tokens": [1, 2**64 - 1],
        "blocks": [link],
        "size": 6,
    }
    async with KuboClient(swarm.nodes[0].api_url) as ipfs:
        cid = await ipfs.dag_put(node)
        assert cid == block_cid(dag_cbor.encode(node), "dag-cbor")
        assert await ipfs.dag_get(cid) == node


async def test_pins_are_added_listed_by_name_and_removed(swarm: LocalSwarm) -> None:
    async with KuboClient(swarm.nodes[0].api_url) as ipfs:
        cid = (await ipfs.block_put(os.urandom(512))).cid
        await ipfs.pin_add(cid, name="pins-test")
        pins = await ipfs.pin_ls(type="recursive", name="pins-test")
        assert [(p.cid, p.type, p.name) for p in pins] == [(cid, "recursive", "pins-test")]
        await ipfs.pin_rm(cid)
        assert await ipfs.pin_ls(type="recursive", name="pins-test") == []
        with pytest.raises(IPFSCommandError, match="not pinned") as raised:
            await ipfs.pin_rm(cid)
        assert raised.value.message == "not pinned or pinned indirectly"


async def test_each_daemon_knows_its_identity_and_has_the_other_two_as_peers(
    swarm: LocalSwarm,
) -> None:
    for node in swarm.nodes:
        async with KuboClient(node.api_url) as ipfs:
            identity = await ipfs.id()
            peers = {p.peer_id for p in await ipfs.swarm_peers()}
        assert identity.peer_id == node.peer_id
        assert identity.agent_version.startswith("kubo/")
        assert peers == {other.peer_id for other in swarm.nodes if other != node}


async def test_a_missing_block_is_not_found_offline_nor_in_the_swarm_in_time(
    swarm: LocalSwarm,
) -> None:
    absent = block_cid(os.urandom(64))
    async with KuboClient(swarm.nodes[0].api_url, timeout=2.0) as ipfs:
        with pytest.raises(IPFSNotFoundError, match="not found locally"):
            await ipfs.block_stat(absent, offline=True)
        started = time.monotonic()
        with pytest.raises(IPFSNotFoundError, match="deadline"):
            await ipfs.block_get(absent)
        assert time.monotonic() - started < 2.0


# --- across the private swarm ------------------------------------------------------------------


async def test_a_block_put_on_the_first_daemon_is_fetched_from_the_third(
    swarm: LocalSwarm,
) -> None:
    first, _, third = swarm.nodes
    data = os.urandom(MAX_BLOCK_SIZE)
    async with KuboClient(first.api_url) as a, KuboClient(third.api_url) as c:
        cid = (await a.block_put(data)).cid
        with pytest.raises(IPFSNotFoundError):
            await c.block_stat(cid, offline=True)
        assert await c.block_get(cid) == data  # over bitswap
        await a.provide(cid)
        providers = {p.peer_id for p in await c.find_providers(cid, limit=2)}
        assert first.peer_id in providers


async def test_a_stopped_daemon_fails_calls_promptly_with_ipfs_unavailable(
    swarm: LocalSwarm,
) -> None:
    swarm.stop(2)
    try:
        async with KuboClient(swarm.nodes[2].api_url, timeout=5.0) as ipfs:
            started = time.monotonic()
            with pytest.raises(IPFSUnavailableError, match="ConnectError") as raised:
                await ipfs.id()
            assert time.monotonic() - started < 5.0
            assert isinstance(raised.value.__cause__, httpx.ConnectError)
    finally:
        swarm.start(2)


async def test_a_hung_daemon_fails_calls_within_the_client_timeout(swarm: LocalSwarm) -> None:
    os.kill(swarm.pid(2), signal.SIGSTOP)
    try:
        async with KuboClient(swarm.nodes[2].api_url, timeout=1.0) as ipfs:
            started = time.monotonic()
            # The kernel may still accept the connection (ReadTimeout) or not (ConnectTimeout).
            with pytest.raises(IPFSUnavailableError, match=r"(Read|Connect)Timeout"):
                await ipfs.id()
            assert time.monotonic() - started < 1.5
    finally:
        os.kill(swarm.pid(2), signal.SIGCONT)


async def test_a_call_made_while_the_daemon_restarts_is_retried_until_it_answers(
    swarm: LocalSwarm,
) -> None:
    swarm.stop(2)
    restart = threading.Thread(target=swarm.start, args=(2,))
    async with KuboClient(swarm.nodes[2].api_url, timeout=30.0, retries=100, backoff=0.05) as ipfs:
        restart.start()
        try:
            identity = await ipfs.id()
        finally:
            await asyncio.to_thread(restart.join)
    assert identity.peer_id == swarm.nodes[2].peer_id


# --- the KV block store ------------------------------------------------------------------------


async def test_a_2_5_mib_chunk_round_trips_through_three_raw_blocks_from_another_daemon(
    swarm: LocalSwarm,
) -> None:
    original = chunk(5 * MiB // 2)
    async with KuboClient(swarm.nodes[0].api_url) as a, KuboClient(swarm.nodes[1].api_url) as b:
        writer = KVBlockStore(a, pin_cap_bytes=64 * MiB)
        reader = KVBlockStore(b, pin_cap_bytes=64 * MiB)
        cid = await writer.put(original)
        manifest = ChunkManifest.decode(await b.block_get(cid))
        assert not await reader.exists(cid)

        assert await reader.get(cid) == original

        assert cid.codec.name == "dag-cbor"
        assert [(await b.block_stat(block)).size for block in manifest.blocks] == [
            MiB,
            MiB,
            MiB // 2,
        ]
        assert manifest.size == len(original.data)
        assert await reader.exists(cid)
        assert [p.cid for p in await b.pin_ls(cid)] == [cid]  # the reader serves it now


class TamperingTransport(httpx.AsyncBaseTransport):
    """A path nobody checked between a store and the daemon: it flips one byte of the named
    blocks in `block/get` answers, as a lying peer or a broken proxy would."""

    def __init__(self, targets: set[CID]) -> None:
        self.targets = {str(cid) for cid in targets}
        self._real = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._real.handle_async_request(request)
        if request.url.path.endswith("/block/get") and request.url.params["arg"] in self.targets:
            body = await response.aread()
            headers = [
                (name, value)
                for name, value in response.headers.items()
                if name.lower() not in ("content-length", "transfer-encoding")
            ]
            tampered = bytes([body[0] ^ 1]) + body[1:]
            return httpx.Response(response.status_code, headers=headers, content=tampered)
        return response

    async def aclose(self) -> None:
        await self._real.aclose()


@pytest.mark.parametrize("tampered", ["a raw block", "the manifest"])
async def test_a_block_substituted_on_the_way_raises_corrupt_block_error(
    swarm: LocalSwarm, tampered: str
) -> None:
    async with KuboClient(swarm.nodes[0].api_url) as a:
        cid = await KVBlockStore(a, pin_cap_bytes=64 * MiB).put(chunk(3 * MiB // 2))
        manifest = ChunkManifest.decode(await a.block_get(cid))
    target = manifest.blocks[1] if tampered == "a raw block" else cid
    transport = TamperingTransport({target})
    async with KuboClient(swarm.nodes[1].api_url, transport=transport) as b:
        with pytest.raises(CorruptBlockError, match=str(target)):
            await KVBlockStore(b, pin_cap_bytes=64 * MiB).get(cid)


async def test_a_manifest_whose_size_its_blocks_cannot_hold_is_refused(swarm: LocalSwarm) -> None:
    async with KuboClient(swarm.nodes[0].api_url) as a:
        block = (await a.block_put(os.urandom(1000))).cid
        lying = ChunkManifest.of(chunk(0), [block]).model_copy(update={"size": 2 * MiB})
        cid = await a.dag_put(lying.to_ipld())
        with pytest.raises(BadManifestError, match="1 blocks cannot hold"):
            await KVBlockStore(a, pin_cap_bytes=64 * MiB).get(cid)


async def test_an_announcement_is_trusted_only_with_the_announcing_peers_signature(
    swarm: LocalSwarm,
) -> None:
    key, impostor = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    trusted = {"peer-a": key.public_key()}
    original = chunk(MiB // 4)
    async with KuboClient(swarm.nodes[0].api_url) as a, KuboClient(swarm.nodes[2].api_url) as c:
        cid = await KVBlockStore(a, pin_cap_bytes=64 * MiB).put(original)

        def signed(signer: Ed25519PrivateKey, peer: str) -> Announcement:
            announcement = announce(
                signer,
                peer=peer,
                model=original.model,
                token_hashes=original.token_hashes,
                manifest=cid,
            )
            return Announcement.decode(announcement.encode())  # as a receiver reads it

        genuine, forged, stranger = (
            signed(key, "peer-a"),
            signed(impostor, "peer-a"),
            signed(impostor, "peer-x"),
        )

        verify_announcement(genuine, trusted)
        with pytest.raises(BadAnnouncementError, match="bad signature"):
            verify_announcement(forged, trusted)
        with pytest.raises(BadAnnouncementError, match="no trusted key"):
            verify_announcement(stranger, trusted)
        assert await KVBlockStore(c, pin_cap_bytes=64 * MiB).get(genuine.manifest) == original


async def test_the_pin_cap_holds_under_a_stream_of_new_chunks_oldest_unused_unpinned_first(
    swarm: LocalSwarm,
) -> None:
    size, cap = 700 * 1024, 5 * MiB // 2  # three chunks fit, a fourth does not
    async with KuboClient(swarm.nodes[0].api_url) as a:
        store = KVBlockStore(a, pin_cap_bytes=cap, pin_name="pin-cap-test")

        async def pinned() -> list[CID]:
            return [p.cid for p in await a.pin_ls(type="recursive", name="pin-cap-test")]

        stored: list[CID] = []
        for index in range(8):
            stored.append(await store.put(chunk(size)))
            if index == 4:
                await store.get(stored[2])  # used again: now the most recent
            held = await pinned()
            assert len(held) * size <= cap
            assert set(held) == set(store.ledger.chunks())
            if index == 6:  # the chunk used again outlived two chunks put after it
                assert set(held) == {stored[2], stored[5], stored[6]}
        assert set(await pinned()) == {stored[5], stored[6], stored[7]}
        assert store.ledger.chunks() == [stored[5], stored[6], stored[7]]

        with pytest.raises(ChunkTooLargeError):
            await store.put(chunk(cap + 2))

        successor = KVBlockStore(a, pin_cap_bytes=2 * size, pin_name="pin-cap-test")
        await successor.adopt_pins()
        assert len(await pinned()) == 2
        assert set(await pinned()) == set(successor.ledger.chunks())


async def test_a_deleted_chunk_is_unpinned_and_gone_from_the_daemon(swarm: LocalSwarm) -> None:
    async with KuboClient(swarm.nodes[1].api_url) as b:
        store = KVBlockStore(b, pin_cap_bytes=64 * MiB, pin_name="delete-test")
        cid = await store.put(chunk(3 * MiB // 2))
        assert await store.exists(cid)
        await store.delete(cid)
        assert not await store.exists(cid)
        assert await b.pin_ls(type="recursive", name="delete-test") == []
        assert store.ledger.pinned_bytes == 0


async def test_put_and_get_rates_of_a_4_mib_chunk_are_reported(
    swarm: LocalSwarm, capsys: pytest.CaptureFixture[str]
) -> None:
    original = chunk(4 * MiB)
    async with KuboClient(swarm.nodes[0].api_url) as a, KuboClient(swarm.nodes[2].api_url) as c:
        writer = KVBlockStore(a, pin_cap_bytes=64 * MiB)
        started = time.perf_counter()
        cid = await writer.put(original)
        put_s = time.perf_counter() - started
        started = time.perf_counter()
        assert await writer.get(cid) == original
        local_s = time.perf_counter() - started
        started = time.perf_counter()
        assert await KVBlockStore(c, pin_cap_bytes=64 * MiB).get(cid) == original
        remote_s = time.perf_counter() - started
    started = time.perf_counter()
    copied = bytearray(original.data)
    copy_s = time.perf_counter() - started
    assert len(copied) == 4 * MiB
    with capsys.disabled():
        print(
            f"\n4 MiB KV chunk on loopback: put {4 / put_s:.0f} MiB/s, "
            f"get from the same daemon {4 / local_s:.0f} MiB/s, "
            f"get from another daemon {4 / remote_s:.0f} MiB/s; "
            f"in-memory copy {4 / copy_s:.0f} MiB/s"
        )
