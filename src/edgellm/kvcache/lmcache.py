"""LMCache's remote storage on IPFS: the plugin through which vLLM workers keep LMCache's KV
chunks in their peer's Kubo daemon, where other peers fetch them, every block checked.

LMCache loads it inside vLLM when its YAML (written by `edgellm.worker.vllm.lmcache_config`)
says so::

    remote_storage_plugins: [ipfs]
    extra_config:
      remote_storage_plugin.ipfs.module_path: edgellm.kvcache.lmcache
      remote_storage_plugin.ipfs.class_name: IpfsConnectorAdapter
      remote_storage_plugin.ipfs.api_url: http://127.0.0.1:5001
      remote_storage_plugin.ipfs.pin_cap_bytes: 21474836480   # optional, as the rest
      remote_storage_plugin.ipfs.index_path: /var/lib/edgellm/lmcache-ipfs.jsonl
      remote_storage_plugin.ipfs.max_keys: 65536
      remote_storage_plugin.ipfs.timeout: 30

with `local_cpu: true` and `max_local_cpu_size > 0` (LMCache stages remote chunks in its CPU
tier). No `remote_url`: for a plugin LMCache's `RemoteBackend` makes the virtual URL
`plugin://ipfs`, which `IpfsConnectorAdapter` claims (plugins named `ipfs` or `ipfs.<instance>`).

What LMCache asks of it was read from lmcache 0.5.6 (the PyPI wheel):
`lmcache/v1/storage_backend/connector/base_connector.py` (`RemoteConnector`: async
`exists/get/put/list/close`, `exists_sync`), `connector/__init__.py` (`ConnectorManager` loads
`module_path`/`class_name`; a `ConnectorAdapter` gets the plugin's name and LMCache's metadata,
a bare `RemoteConnector` subclass only `loop`, `local_cpu_backend` and `config`),
`connector/instrumented_connector.py` (it drops the `MemoryObj`'s reference after `put`),
`remote_backend.py` (calls come as coroutines on LMCache's event-loop thread; `exists_sync` from
other threads; a failed or missing `get` is `None`) and `connector/fs_connector.py` (a `get`
allocates its `MemoryObj` from `local_cpu_backend.allocate(shapes, dtypes, fmt)`).

Why this and not LMCache's newer L2 adapter (`lmcache/v1/distributed/l2_adapters/base.py`): that
interface belongs to LMCache's multiprocess mode (a separate LMCache server, event-fd task
queues, bitmaps), while EdgeLLM's vLLM backend runs LMCache in-process through
`LMCacheConnectorV1` with a YAML config, which loads remote connectors. Should the backend move
to multiprocess mode, the same store fits an L2 adapter: the key-to-chunk mapping below is
the part that carries over.

Each LMCache chunk becomes one `KVChunk` of `KVBlockStore` (raw blocks under a DAG-CBOR
manifest, pinned within a byte cap under the pin name `edgellm-lmcache`): the model is the key's
model name, the token chain the key's chunk hash (its low 64 bits), the bytes the
`MemoryObj`'s, and its shapes, dtypes and memory format are kept in the manifest's
shape/dtype/layout (`lmcache/<format>/<rank of each group's shape>`). LMCache looks chunks up
by key string (`CacheEngineKey.to_string()`: `model@world_size@worker_id@chunk_hash@dtype`),
IPFS by content, so a `KeyIndex` (bounded, least recently used forgotten first) maps one to
the other; with `index_path` it is journaled to a file, so a restarted worker, which adopts the
pins its store left, finds its chunks again. Another peer's chunk is found once the mapping is
told to the index (`IpfsConnector.remember`, e.g. from a peer's KV announcement); `get` then
fetches it through this peer's daemon, and checks that its manifest names the key's model and
chunk hash.

It imports lmcache and torch, so it imports only where the `gpu` extra is installed; mypy
checks it with lmcache's types missing (pyproject's override). Errors of the IPFS client and
the block store pass through `put` (LMCache logs a failed put); `get` answers None for a chunk
it cannot load, and logs why.
"""

import asyncio
import builtins
import concurrent.futures
import contextlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Self

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryFormat, MemoryObj
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.connector import (
    ConnectorAdapter,
    ConnectorContext,
    extract_plugin_type,
)
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
from multiformats import CID

from edgellm.kvcache.blockstore import BlockStoreError, KVBlockStore, KVChunk
from edgellm.kvcache.hashing import external_hash
from edgellm.kvcache.ipfs import DEFAULT_API_URL, IPFSError, KuboClient, as_cid

logger = logging.getLogger(__name__)

PLUGIN_TYPE: Final = "ipfs"
PIN_NAME: Final = "edgellm-lmcache"
LAYOUT_PREFIX: Final = "lmcache/"
_PLUGIN_URL: Final = "plugin://"
# A journal this many times longer than the index (plus slack) is rewritten when loaded.
_COMPACT_FACTOR: Final = 2
_COMPACT_SLACK: Final = 1024

Origin = Literal["local", "peer"]


# --- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class IpfsOptions:
    """The plugin's settings, from LMCache's `extra_config` under
    `remote_storage_plugin.<plugin name>.`."""

    api_url: str = DEFAULT_API_URL
    pin_cap_bytes: int = 20 << 30
    index_path: Path | None = None
    max_keys: int = 65536
    timeout: float = 30.0

    @classmethod
    def from_extra_config(cls, extra_config: Mapping[str, Any] | None, plugin: str) -> Self:
        extra = extra_config or {}
        prefix = f"remote_storage_plugin.{plugin}."

        def option(name: str, default: Any) -> Any:
            return extra.get(prefix + name, default)

        index_path = option("index_path", None)
        options = cls(
            api_url=str(option("api_url", cls.api_url)),
            pin_cap_bytes=int(option("pin_cap_bytes", cls.pin_cap_bytes)),
            index_path=Path(index_path) if index_path else None,
            max_keys=int(option("max_keys", cls.max_keys)),
            timeout=float(option("timeout", cls.timeout)),
        )
        if options.pin_cap_bytes < 1 or options.max_keys < 1 or options.timeout <= 0:
            raise ValueError(f"{prefix}pin_cap_bytes, max_keys and timeout must be positive")
        return options


# --- chunk metadata --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkLayout:
    """What LMCache needs to allocate a chunk's `MemoryObj`: one shape and dtype per KV group
    (one, but for models whose layers differ), and the memory format."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]  # torch's names: "bfloat16", "float16", ...
    fmt: str  # a MemoryFormat's name: "KV_2LTD", "KV_MLA_FMT", ...

    @classmethod
    def of(cls, memory_obj: MemoryObj) -> Self:
        return cls(
            shapes=tuple(tuple(int(d) for d in shape) for shape in memory_obj.get_shapes()),
            dtypes=tuple(_dtype_name(d) for d in memory_obj.get_dtypes()),
            fmt=memory_obj.get_memory_format().name,
        )

    def chunk(self, model: str, chunk_hash: int | bytes, data: bytes) -> KVChunk:
        """A `KVChunk` holding these: shapes concatenated, and their ranks in the layout so
        that they split again."""
        ranks = ",".join(str(len(shape)) for shape in self.shapes)
        return KVChunk(
            model=model,
            token_hashes=(external_hash(chunk_hash),),
            dtype=",".join(self.dtypes),
            shape=tuple(d for shape in self.shapes for d in shape),
            layout=f"{LAYOUT_PREFIX}{self.fmt}/{ranks}",
            data=data,
        )

    @classmethod
    def read(cls, chunk: KVChunk) -> Self:
        """The layout a chunk was stored with; ValueError if it is not one of ours."""
        if not chunk.layout.startswith(LAYOUT_PREFIX):
            raise ValueError(f"layout {chunk.layout!r} is not an LMCache chunk's")
        fmt, _, ranks_text = chunk.layout[len(LAYOUT_PREFIX) :].partition("/")
        ranks = [int(r) for r in ranks_text.split(",")]
        dtypes = tuple(chunk.dtype.split(","))
        if len(dtypes) != len(ranks) or sum(ranks) != len(chunk.shape) or min(ranks) < 1:
            raise ValueError(f"shape {chunk.shape}, dtypes {dtypes} and layout do not agree")
        shapes, start = [], 0
        for rank in ranks:
            shapes.append(chunk.shape[start : start + rank])
            start += rank
        layout = cls(shapes=tuple(shapes), dtypes=dtypes, fmt=fmt)
        layout.torch_dtypes()  # every name is a torch dtype
        layout.memory_format()
        return layout

    def torch_dtypes(self) -> list[torch.dtype]:
        dtypes = []
        for name in self.dtypes:
            dtype = getattr(torch, name, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{name!r} is not a torch dtype")
            dtypes.append(dtype)
        return dtypes

    def torch_shapes(self) -> list[torch.Size]:
        return [torch.Size(shape) for shape in self.shapes]

    def memory_format(self) -> MemoryFormat:
        try:
            return MemoryFormat[self.fmt]
        except KeyError as e:
            raise ValueError(f"{self.fmt!r} is not an LMCache memory format") from e

    @property
    def size(self) -> int:
        """Bytes of a chunk of this layout."""
        total = 0
        for shape, dtype in zip(self.shapes, self.torch_dtypes(), strict=True):
            count = 1
            for d in shape:
                count *= d
            total += count * dtype.itemsize
        return total


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- the key index ---------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexEntry:
    cid: CID
    origin: Origin  # stored by this peer, or told to us as held by another


class KeyIndex:
    """Which manifest holds each LMCache key, least recently used first, at most `max_keys`.

    Chunks this peer stored are appended to `journal` (JSON lines `{"key", "cid"}`, a null cid
    for a forgotten key) when one is given, and `load` reads them back after a restart. Safe
    across threads: LMCache asks `exists_sync` from threads other than its event loop's. The
    journal is written synchronously, a line of a hundred bytes at a time."""

    def __init__(self, max_keys: int, journal: Path | None = None) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be positive, not {max_keys}")
        self.max_keys = max_keys
        self.journal = journal
        self._entries: OrderedDict[str, IndexEntry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> IndexEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def remember(self, key: str, cid: CID, origin: Origin = "local") -> None:
        with self._lock:
            self._entries[key] = IndexEntry(cid, origin)
            self._entries.move_to_end(key)
            forgotten = []
            while len(self._entries) > self.max_keys:
                oldest, entry = self._entries.popitem(last=False)
                if entry.origin == "local":
                    forgotten.append(oldest)
            if origin == "local":
                self._append([(key, cid), *((k, None) for k in forgotten)])

    def forget(self, key: str) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None and entry.origin == "local":
                self._append([(key, None)])

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def load(self) -> None:
        """Reads the journal (later lines win; unreadable lines, e.g. a torn last one, are
        skipped) and rewrites it when it has grown far beyond the index."""
        if self.journal is None or not self.journal.exists():
            return
        entries: OrderedDict[str, CID] = OrderedDict()
        lines = 0
        with self.journal.open(encoding="utf-8") as f:
            for line in f:
                lines += 1
                try:
                    record = json.loads(line)
                    key, cid = record["key"], record["cid"]
                    entries.pop(key, None)
                    if cid is not None:
                        entries[key] = as_cid(cid)
                except (ValueError, KeyError, TypeError):
                    logger.warning("skipping an unreadable line of %s", self.journal)
        with self._lock:
            for key, cid in list(entries.items())[-self.max_keys :]:
                self._entries[key] = IndexEntry(cid, "local")
                self._entries.move_to_end(key)
            if lines > _COMPACT_FACTOR * len(self._entries) + _COMPACT_SLACK:
                self._rewrite()

    def _append(self, records: list[tuple[str, CID | None]]) -> None:
        if self.journal is None:
            return
        text = "".join(
            json.dumps({"key": k, "cid": None if c is None else str(c)}) + "\n" for k, c in records
        )
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with self.journal.open("a", encoding="utf-8") as f:
            f.write(text)

    def _rewrite(self) -> None:
        assert self.journal is not None
        temporary = self.journal.with_suffix(self.journal.suffix + ".tmp")
        with temporary.open("w", encoding="utf-8") as f:
            for key, entry in self._entries.items():
                if entry.origin == "local":
                    f.write(json.dumps({"key": key, "cid": str(entry.cid)}) + "\n")
        os.replace(temporary, self.journal)


# --- the connector ---------------------------------------------------------------------------


class IpfsConnector(RemoteConnector):
    """LMCache's remote connector on a `KVBlockStore` in one Kubo daemon.

    LMCache's `ConnectorManager` builds it through `IpfsConnectorAdapter` (with the plugin's
    name and LMCache's metadata) or, named directly as the plugin's class, with `loop`,
    `local_cpu_backend` and `config` only (the metadata is then the CPU backend's)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        local_cpu_backend: LocalCPUBackend,
        config: LMCacheEngineConfig,
        metadata: LMCacheMetadata | None = None,
        plugin_name: str = PLUGIN_TYPE,
        *,
        ipfs: KuboClient | None = None,
    ) -> None:
        super().__init__(config, metadata if metadata is not None else local_cpu_backend.metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.options = IpfsOptions.from_extra_config(config.extra_config, plugin_name)
        self.ipfs = ipfs or KuboClient(self.options.api_url, timeout=self.options.timeout)
        self.store = KVBlockStore(
            self.ipfs, pin_cap_bytes=self.options.pin_cap_bytes, pin_name=PIN_NAME
        )
        self.index = KeyIndex(self.options.max_keys, self.options.index_path)
        self._started = False
        self._starting = asyncio.Lock()

    def post_init(self) -> None:
        """Called by LMCache once it has built the connector: adopts the pins and the index a
        previous run left, on LMCache's loop, without waiting for them."""
        if not self.loop.is_closed():
            started = asyncio.run_coroutine_threadsafe(self.start(), self.loop)
            started.add_done_callback(_log_failure)

    async def start(self) -> None:
        """Counts the chunks a previous run left pinned, then reads the journal, keeping the
        keys whose chunks are still pinned. Every other method calls it first; runs once."""
        async with self._starting:
            if self._started:
                return
            await self.store.adopt_pins()
            await asyncio.to_thread(self.index.load)
            for key in self.index.names():
                entry = self.index.get(key)
                if entry is not None and entry.cid not in self.store.ledger:
                    self.index.forget(key)
            self._started = True
            logger.info(
                "IPFS store at %s: %d chunks pinned, %d keys known",
                self.ipfs.url,
                len(self.store.ledger),
                len(self.index),
            )

    def remember(self, key: str, manifest: CID | str) -> None:
        """Tells the connector that another peer holds `key`'s chunk under `manifest`: `exists`
        answers yes, and `get` fetches it through the swarm."""
        self.index.remember(key, as_cid(manifest), origin="peer")

    # --- RemoteConnector -------------------------------------------------------------------

    async def exists(self, key: CacheEngineKey) -> bool:
        await self.start()
        return self._exists(key.to_string())

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return self._exists(key.to_string())

    def _exists(self, key: str) -> bool:
        entry = self.index.get(key)
        if entry is None:
            return False
        if entry.cid in self.store.ledger or entry.origin == "peer":
            return True
        self.index.forget(key)  # our own chunk, unpinned since to keep within the cap
        return False

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        # Copied first: the caller may reuse the memory once this returns.
        data = bytes(memory_obj.byte_array)
        chunk = ChunkLayout.of(memory_obj).chunk(key.model_name, key.chunk_hash, data)
        await self.start()
        cid = await self.store.put(chunk)
        self.index.remember(key.to_string(), cid)

    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        await self.start()
        name = key.to_string()
        entry = self.index.get(name)
        if entry is None:
            return None
        try:
            chunk = await self.store.get(entry.cid)
            layout = self._check(key, chunk)
        except (IPFSError, BlockStoreError, ValueError) as e:
            logger.warning("cannot load %s from IPFS (%s): %s", name, entry.cid, e)
            self.index.forget(name)
            return None
        if entry.origin == "peer":  # pinned here now: ours to serve and to journal
            self.index.remember(name, entry.cid)
        memory_obj = self.local_cpu_backend.allocate(
            layout.torch_shapes(), layout.torch_dtypes(), layout.memory_format()
        )
        if memory_obj is None:
            logger.debug("no CPU memory for %s", name)
            return None
        target = memoryview(memory_obj.byte_array).cast("B")
        if len(target) != len(chunk.data):
            memory_obj.ref_count_down()
            logger.warning(
                "%s: LMCache allocated %d bytes, not %d", name, len(target), len(chunk.data)
            )
            return None
        target[:] = chunk.data
        return memory_obj

    def _check(self, key: CacheEngineKey, chunk: KVChunk) -> ChunkLayout:
        """The chunk's layout; ValueError unless it is the key's chunk, whole."""
        if chunk.model != key.model_name or chunk.token_hashes != (external_hash(key.chunk_hash),):
            raise ValueError(f"the manifest holds {chunk.model}'s chunk {chunk.token_hashes}")
        layout = ChunkLayout.read(chunk)
        if layout.size != len(chunk.data):
            raise ValueError(f"{len(chunk.data)} bytes for a {layout.size}-byte layout")
        return layout

    async def list(self) -> builtins.list[str]:
        await self.start()
        return [key for key in self.index.names() if self._exists(key)]

    def remove_sync(self, key: CacheEngineKey) -> bool:
        """Forgets a key and unpins its chunk (from a thread other than LMCache's loop's)."""
        name = key.to_string()
        entry = self.index.get(name)
        if entry is None:
            return False
        self.index.forget(name)
        if entry.origin == "local":
            future = asyncio.run_coroutine_threadsafe(self.store.delete(entry.cid), self.loop)
            future.result(self.options.timeout)
        return True

    async def close(self) -> None:
        with contextlib.suppress(IPFSError):
            await self.ipfs.aclose()

    def __repr__(self) -> str:
        return f"<IpfsConnector {self.ipfs.url}>"


def _log_failure(future: "concurrent.futures.Future[None]") -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("the IPFS store did not start (it retries on use): %s", future.exception())


class IpfsConnectorAdapter(ConnectorAdapter):
    """What LMCache loads as the plugin's class: it claims `plugin://ipfs` (and
    `plugin://ipfs.<instance>`) and builds the connector with the plugin's own settings."""

    def __init__(self) -> None:
        super().__init__(_PLUGIN_URL)

    def can_parse(self, url: str) -> bool:
        return url.startswith(_PLUGIN_URL) and (
            extract_plugin_type(url[len(_PLUGIN_URL) :]) == PLUGIN_TYPE
        )

    def create_connector(self, context: ConnectorContext) -> IpfsConnector:
        if context.config is None:
            raise ValueError("the IPFS connector needs LMCache's config")
        return IpfsConnector(
            context.loop,
            context.local_cpu_backend,
            context.config,
            context.metadata,
            context.plugin_name or PLUGIN_TYPE,
        )
