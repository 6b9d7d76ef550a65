"""LMCache's remote storage on IPFS, with the real `lmcache` package on its CPU path and two real
Kubo daemons in a private swarm (hack/tools.sh builds the pinned `ipfs`).

LMCache itself loads the plugin from the settings the vLLM backend generates (its
`RemoteBackend` -> `CreateConnector` -> `ConnectorManager`, as inside vLLM), with its own event
loop on a thread and its `LocalCPUBackend` as the memory the chunks come from and go to. Skipped
where lmcache is not installed: it is the `gpu` extra, which pulls torch and CUDA packages.
"""

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("lmcache", reason="LMCache (the gpu extra) is not installed")

import torch  # lmcache depends on it
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
from lmcache.v1.storage_backend.remote_backend import RemoteBackend

from edgellm.dev.ipfs import LocalSwarm
from edgellm.kvcache.lmcache import PIN_NAME, ChunkLayout, IndexEntry, IpfsConnector
from edgellm.worker.vllm import VllmSettings, lmcache_config

MODEL = "tiny-random"
# (layers, K and V, tokens per chunk, KV heads, head size): 4 * 2 * 256 * 8 * 64 halves = 2 MiB
# per chunk, so each spans three blocks of the store.
KV_SHAPE = (4, 2, 256, 8, 64)
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("ipfs"), 2) as swarm:
        yield swarm


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """LMCache's event loop, on its own thread as LMCache runs it inside vLLM."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def engine_config(tmp_path: Path, api: str, index: Path | None = None) -> LMCacheEngineConfig:
    """LMCache's config read from the YAML the vLLM backend writes, as vLLM's LMCache does."""
    ipfs: dict[str, Any] = {"api": api, "pinCapGb": 0.5}
    if index is not None:
        ipfs["indexPath"] = str(index)
    vllm = VllmSettings.model_validate(
        {
            "model": MODEL,
            "servedModelName": MODEL,
            "lmcache": {"maxLocalCpuSize": 0.25, "ipfs": ipfs},
        }
    )
    path = tmp_path / f"lmcache-{abs(hash(api))}.yaml"
    path.write_text(yaml.safe_dump(lmcache_config(vllm)))
    config = LMCacheEngineConfig.from_file(str(path))
    config.validate()
    return config


def metadata() -> LMCacheMetadata:
    return LMCacheMetadata(
        model_name=MODEL,
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=torch.float16,
        kv_shape=KV_SHAPE,
        chunk_size=KV_SHAPE[2],
    )


class Peer:
    """One vLLM worker's LMCache storage: the CPU tier and the remote backend on IPFS."""

    def __init__(self, config: LMCacheEngineConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.metadata = metadata()
        self.cpu = LocalCPUBackend(config, self.metadata, dst_device="cpu")
        self.remote = RemoteBackend(
            config, self.metadata, loop, self.cpu, dst_device="cpu", plugin_name="ipfs"
        )
        assert self.remote.connection is not None, "LMCache did not load the IPFS plugin"
        self.connector = self.remote.connection._connector
        assert isinstance(self.connector, IpfsConnector)

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT)

    def chunk(self, seed: int) -> MemoryObj:
        """A full chunk of random halves in LMCache's CPU memory."""
        memory_obj = self.cpu.allocate(
            self.metadata.get_shapes(), self.metadata.get_dtypes(), busy_loop=False
        )
        assert memory_obj is not None
        generator = torch.Generator().manual_seed(seed)
        memory_obj.tensor.copy_(torch.randn(memory_obj.tensor.shape, generator=generator))
        return memory_obj

    def close(self) -> None:
        self.remote.close()


def key(chunk_hash: int) -> CacheEngineKey:
    return CacheEngineKey(MODEL, 1, 0, chunk_hash, torch.float16)


@pytest.fixture
def peers(
    swarm: LocalSwarm, loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> Iterator[list[Peer]]:
    peers = [
        Peer(engine_config(tmp_path, node.api_url, tmp_path / f"index-{i}.jsonl"), loop)
        for i, node in enumerate(swarm.nodes)
    ]
    try:
        yield peers
    finally:
        for peer in peers:
            peer.close()


def test_a_chunk_put_through_lmcache_comes_back_byte_for_byte_from_another_daemon(
    peers: list[Peer],
) -> None:
    a, b = peers
    stored = a.chunk(seed=1)
    expected = bytes(stored.byte_array)
    k = key(0x1234ABCD)
    a.remote.submit_put_task(k, stored).result(TIMEOUT)

    assert a.remote.contains(k)
    local = a.remote.get_blocking(k)
    assert local is not None
    assert bytes(local.byte_array) == expected
    local.ref_count_down()

    # B learns where the chunk is (a peer's announcement would tell it) and fetches it over
    # the swarm into its own LMCache memory.
    manifest = a.connector.index.get(k.to_string())
    assert manifest is not None
    assert not b.remote.contains(k)
    b.connector.remember(k.to_string(), manifest.cid)
    assert b.remote.contains(k)
    fetched = b.remote.get_blocking(k)
    assert fetched is not None
    assert bytes(fetched.byte_array) == expected
    assert fetched.get_shapes() == stored.get_shapes()
    assert fetched.get_dtypes() == [torch.float16]
    assert fetched.get_memory_format() == stored.get_memory_format()
    fetched.ref_count_down()
    stored.ref_count_down()
    # B pinned the chunk as it fetched it: it now serves it, and remembers it as its own.
    assert manifest.cid in b.connector.store.ledger
    assert b.connector.index.get(k.to_string()) == IndexEntry(manifest.cid, "local")


def test_a_key_never_stored_is_not_found(peers: list[Peer]) -> None:
    a, _ = peers
    k = key(0xDEAD)
    assert not a.remote.contains(k)
    assert not a.run(a.connector.exists(k))
    assert not a.connector.exists_sync(k)
    assert a.remote.get_blocking(k) is None


def test_a_chunk_under_another_key_is_refused(peers: list[Peer]) -> None:
    a, b = peers
    stored = a.chunk(seed=2)
    a.remote.submit_put_task(key(0x42), stored).result(TIMEOUT)
    stored.ref_count_down()
    manifest = a.connector.index.get(key(0x42).to_string())
    assert manifest is not None
    b.connector.remember(key(0x43).to_string(), manifest.cid)  # a wrong or lying mapping
    assert b.remote.get_blocking(key(0x43)) is None
    assert not b.remote.contains(key(0x43))  # and forgotten


def test_a_restarted_worker_finds_the_chunks_it_stored(
    swarm: LocalSwarm, loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    index = tmp_path / "restart-index.jsonl"
    config = engine_config(tmp_path, swarm.nodes[0].api_url, index)
    first = Peer(config, loop)
    stored = first.chunk(seed=3)
    expected = bytes(stored.byte_array)
    k = key(0x5151)
    first.remote.submit_put_task(k, stored).result(TIMEOUT)
    stored.ref_count_down()
    first.close()

    again = Peer(config, loop)
    try:
        assert again.run(again.connector.list()).count(k.to_string()) == 1
        loaded = again.remote.get_blocking(k)
        assert loaded is not None
        assert bytes(loaded.byte_array) == expected
        loaded.ref_count_down()
    finally:
        again.close()


def test_layouts_round_trip_through_the_manifest_fields(peers: list[Peer]) -> None:
    a, _ = peers
    memory_obj = a.chunk(seed=4)
    layout = ChunkLayout.of(memory_obj)
    chunk = layout.chunk(MODEL, 7, b"\0" * layout.size)
    assert chunk.layout == "lmcache/KV_2LTD/4"
    assert chunk.dtype == "float16"
    assert ChunkLayout.read(chunk) == layout
    memory_obj.ref_count_down()


def test_chunks_are_pinned_under_the_plugins_own_name(peers: list[Peer]) -> None:
    a, _ = peers
    stored = a.chunk(seed=5)
    a.remote.submit_put_task(key(0x77), stored).result(TIMEOUT)
    stored.ref_count_down()
    pins = a.run(a.connector.ipfs.pin_ls(type="recursive", name=PIN_NAME))
    manifest = a.connector.index.get(key(0x77).to_string())
    assert manifest is not None
    assert manifest.cid in {pin.cid for pin in pins}
