"""KV chunks in IPFS: how a peer publishes KV cache it computed, so that other peers load it
instead of recomputing it, and how they check what they load.

A chunk (the KV tensors of a run of token blocks, as bytes, with what a reader needs to rebuild
them) is stored as raw blocks of at most 1 MiB, the largest every bitswap peer carries, under a
DAG-CBOR manifest that links them; the manifest's CID names the chunk. The store pins the chunks
it puts or gets up to a byte cap and unpins the least recently used first. Every block it reads
is hashed again against its CID: blocks may come through paths nobody checked (a gateway, a
proxy, a peer's daemon). A peer tells others about a chunk with an announcement "this token
chain -> this manifest" signed with its Ed25519 key; receivers verify it against keys they trust.
Its users: vLLM workers through LMCache's IPFS plugin (`kvcache.lmcache`), and llama.cpp
workers saving and loading their KV (`worker.ipfskv`); the e2e tests drive it against real
daemons. It imports nothing of EdgeLLM outside `kvcache`.

Errors (the Kubo client's, `ipfs.IPFSError`, pass through):

    BlockStoreError
    ├── CorruptBlockError       a block's bytes do not hash to its CID
    ├── BadManifestError        a manifest that is not a well-formed chunk manifest
    ├── ChunkTooLargeError      a chunk bigger than the whole pin cap
    └── BadAnnouncementError    an announcement that is malformed or not signed by a trusted key
"""

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Self, TypeVar

import dag_cbor
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from dag_cbor.decoding import CBORDecodingError
from multiformats import CID, multihash
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBytes,
    StrictInt,
    StrictStr,
    ValidationError,
)

from edgellm.kvcache.hashing import ExternalBlockHash
from edgellm.kvcache.ipfs import CIDLike, IPFSCommandError, IPFSNotFoundError, KuboClient, as_cid

# Bitswap peers refuse larger blocks (Kubo 0.42 raised its own limit to 2 MiB; older and
# other implementations stop at 1 MiB).
MAX_BLOCK_SIZE = 1 << 20
# Versions of the two wire formats; a reader refuses any other.
ManifestFormat = Literal["edgellm/kv-chunk@1"]
AnnouncementFormat = Literal["edgellm/kv-announcement@1"]
MANIFEST_FORMAT: ManifestFormat = "edgellm/kv-chunk@1"
ANNOUNCEMENT_FORMAT: AnnouncementFormat = "edgellm/kv-announcement@1"
DEFAULT_PIN_NAME = "edgellm-kv"
_HASH_FUNCTION = "sha2-256"  # Kubo's default, so our CIDs and Kubo's agree


class BlockStoreError(Exception):
    """KV data, or a claim about it, that cannot be used."""


class CorruptBlockError(BlockStoreError):
    pass


class BadManifestError(BlockStoreError):
    pass


class ChunkTooLargeError(BlockStoreError):
    pass


class BadAnnouncementError(BlockStoreError):
    pass


# --- content addressing ----------------------------------------------------------------------


def block_cid(data: bytes, codec: str = "raw") -> CID:
    """The CIDv1 Kubo gives `data` stored as one block of `codec` (sha2-256, base32)."""
    return CID("base32", 1, codec, multihash.digest(data, _HASH_FUNCTION))


def verify_block(cid: CID, data: bytes) -> None:
    """Raises CorruptBlockError unless `data` hashes to `cid`'s multihash."""
    try:
        digest = multihash.digest(data, cid.hashfun.name, size=len(cid.raw_digest))
    except (KeyError, ValueError) as e:  # a hash function multiformats does not implement
        raise CorruptBlockError(f"{cid}: cannot check a {cid.hashfun.name} digest") from e
    if digest != cid.digest:
        raise CorruptBlockError(f"{cid}: the {len(data)} bytes received hash to something else")


def split_blocks(data: bytes, block_size: int = MAX_BLOCK_SIZE) -> list[bytes]:
    """`data` in consecutive blocks of `block_size` bytes, the last one shorter; none if empty."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, not {block_size}")
    view = memoryview(data)
    return [bytes(view[i : i + block_size]) for i in range(0, len(data), block_size)]


# --- chunks and manifests --------------------------------------------------------------------


def _in_base32(cid: CID) -> CID:
    # DAG-CBOR holds CIDs as bytes and the decoder renders them in base58; Kubo and people
    # read CIDv1 in base32.
    return cid.set(base="base32") if cid.version == 1 else cid


def _raw_in_base32(cid: CID) -> CID:
    if cid.codec.name != "raw":
        raise ValueError(f"{cid} is a {cid.codec.name} block, not a raw one")
    return _in_base32(cid)


TokenHash = Annotated[StrictInt, Field(ge=0, lt=1 << 64)]  # an ExternalBlockHash on the wire
Dimension = Annotated[StrictInt, Field(ge=0)]
Link = Annotated[CID, AfterValidator(_in_base32)]
RawBlock = Annotated[CID, AfterValidator(_raw_in_base32)]


@dataclass(frozen=True)
class KVChunk:
    """KV cache of a run of token blocks: the bytes, and how to read them back.

    `token_hashes` is the chain of block hashes the chunk covers (`hashing.external_hash` of
    `block_hashes`), so a chunk found by its last hash covers the whole prefix. `dtype`,
    `shape` and `layout` (e.g. "layers,kv,tokens,heads,head_dim") are the writer's, kept as
    given: the store does not interpret them."""

    model: str
    token_hashes: tuple[ExternalBlockHash, ...]
    dtype: str
    shape: tuple[int, ...]
    layout: str
    data: bytes = field(repr=False)  # megabytes: not for logs and test reports


class ChunkManifest(BaseModel):
    """A chunk's DAG-CBOR root: its metadata and the raw blocks that hold its bytes in order."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    format: ManifestFormat = MANIFEST_FORMAT
    model: StrictStr
    token_hashes: tuple[TokenHash, ...] = Field(alias="tokens")
    dtype: StrictStr
    shape: tuple[Dimension, ...]
    layout: StrictStr
    blocks: tuple[RawBlock, ...]
    size: Dimension

    @classmethod
    def of(cls, chunk: KVChunk, blocks: Sequence[CID]) -> Self:
        return cls(
            model=chunk.model,
            tokens=chunk.token_hashes,
            dtype=chunk.dtype,
            shape=chunk.shape,
            layout=chunk.layout,
            blocks=tuple(blocks),
            size=len(chunk.data),
        )

    def chunk(self, data: bytes) -> KVChunk:
        return KVChunk(
            model=self.model,
            token_hashes=tuple(ExternalBlockHash(h) for h in self.token_hashes),
            dtype=self.dtype,
            shape=self.shape,
            layout=self.layout,
            data=data,
        )

    def to_ipld(self) -> dict[str, Any]:
        fields = self.model_dump(by_alias=True)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}

    def encode(self) -> bytes:
        return dag_cbor.encode(self.to_ipld())

    @property
    def cid(self) -> CID:
        return block_cid(self.encode(), "dag-cbor")

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Reads a manifest; BadManifestError if it is not DAG-CBOR of this schema, or if its
        size cannot be what its blocks hold (so a forged one cannot make us fetch without end)."""
        try:
            manifest = cls.model_validate(dag_cbor.decode(data))
        except (CBORDecodingError, ValidationError) as e:
            raise BadManifestError(f"not a KV chunk manifest: {e}") from e
        count = len(manifest.blocks)
        if not count <= manifest.size <= count * MAX_BLOCK_SIZE:
            raise BadManifestError(f"{count} blocks cannot hold {manifest.size} bytes")
        return manifest


# --- pins ------------------------------------------------------------------------------------


class PinLedger:
    """Which chunks the store keeps pinned, least recently used first, within a byte cap.

    Pure bookkeeping: the store unpins what `touch` evicts. A chunk counts its data bytes;
    manifests (a few hundred bytes) and blocks shared between chunks are not told apart."""

    def __init__(self, cap_bytes: int) -> None:
        if cap_bytes < 1:
            raise ValueError(f"the pin cap must be positive, not {cap_bytes}")
        self.cap_bytes = cap_bytes
        self._sizes: OrderedDict[CID, int] = OrderedDict()

    @property
    def pinned_bytes(self) -> int:
        return sum(self._sizes.values())

    def chunks(self) -> list[CID]:
        """The pinned chunks, least recently used first."""
        return list(self._sizes)

    def require_fits(self, size: int) -> None:
        if size > self.cap_bytes:
            raise ChunkTooLargeError(f"a {size}-byte chunk exceeds the {self.cap_bytes}-byte cap")

    def touch(self, cid: CID, size: int) -> list[CID]:
        """Records a chunk as used now; returns the chunks to unpin, oldest first, so that it
        fits. A chunk already pinned only moves to the recent end."""
        if cid in self._sizes:
            self._sizes.move_to_end(cid)
            return []
        self.require_fits(size)
        evicted = []
        while self.pinned_bytes + size > self.cap_bytes:
            oldest, _ = self._sizes.popitem(last=False)
            evicted.append(oldest)
        self._sizes[cid] = size
        return evicted

    def forget(self, cid: CID) -> None:
        self._sizes.pop(cid, None)

    def __contains__(self, cid: object) -> bool:
        return cid in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)


# --- the store -------------------------------------------------------------------------------

T = TypeVar("T")


class KVBlockStore:
    """KV chunks in one Kubo daemon, pinned under `pin_name` within `pin_cap_bytes`."""

    def __init__(
        self,
        ipfs: KuboClient,
        *,
        pin_cap_bytes: int,
        pin_name: str = DEFAULT_PIN_NAME,
        parallel: int = 8,
    ) -> None:
        self.ipfs = ipfs
        self.pin_name = pin_name
        self.ledger = PinLedger(pin_cap_bytes)
        self._parallel = asyncio.Semaphore(parallel)
        # Pins change one chunk at a time, so the cap holds between any two of them.
        self._pinning = asyncio.Lock()

    async def put(self, chunk: KVChunk) -> CID:
        """Stores and pins a chunk; returns its manifest's CID, the name others fetch it by."""
        self.ledger.require_fits(len(chunk.data))
        blocks = split_blocks(chunk.data)
        # Named here first, so bad metadata fails before anything is stored.
        manifest = ChunkManifest.of(chunk, [block_cid(b) for b in blocks])
        await self._each(
            self._put_block(c, b) for c, b in zip(manifest.blocks, blocks, strict=True)
        )
        # Blocks are unpinned until the manifest's recursive pin: a garbage collection run in
        # between (off by default in Kubo) would drop them and the pin below would fail.
        cid = await self.ipfs.dag_put(manifest.to_ipld())
        if cid != manifest.cid:
            raise CorruptBlockError(f"Kubo named the manifest {cid}, not {manifest.cid}")
        await self._keep(cid, manifest.size)
        return cid

    async def get(self, manifest_cid: CIDLike) -> KVChunk:
        """Fetches a chunk from this daemon or, through it, from the swarm, checks every block
        and pins it (so this peer serves it next)."""
        cid = as_cid(manifest_cid)
        manifest = await self._manifest(cid, offline=False)
        self.ledger.require_fits(manifest.size)
        blocks = await self._each(self._get_block(b) for b in manifest.blocks)
        data = b"".join(blocks)
        if len(data) != manifest.size:
            raise BadManifestError(f"{cid} says {manifest.size} bytes; its blocks hold {len(data)}")
        await self._keep(cid, manifest.size)
        return manifest.chunk(data)

    async def exists(self, manifest_cid: CIDLike) -> bool:
        """Whether this daemon holds the whole chunk, so a `get` needs no other peer."""
        cid = as_cid(manifest_cid)
        try:
            manifest = await self._manifest(cid, offline=True)
            await self._each(self.ipfs.block_stat(b, offline=True) for b in manifest.blocks)
        except IPFSNotFoundError:
            return False
        return True

    async def delete(self, manifest_cid: CIDLike) -> None:
        """Unpins a chunk and removes its blocks here, except those another pin still holds."""
        cid = as_cid(manifest_cid)
        async with self._pinning:
            self.ledger.forget(cid)
            await self._unpin(cid)
        try:
            manifest = await self._manifest(cid, offline=True)
        except IPFSNotFoundError:
            return
        # Kubo keeps pinned blocks and reports absent ones; both are fine for a delete.
        await self.ipfs.block_rm(cid, *manifest.blocks)

    async def adopt_pins(self) -> None:
        """Counts the chunks an earlier store left pinned under `pin_name` (after a restart),
        unpinning as many as the cap requires."""
        pins = await self.ipfs.pin_ls(type="recursive", name=self.pin_name)
        for pin in pins:
            if pin.name == self.pin_name:  # Kubo matches names by substring
                manifest = await self._manifest(pin.cid, offline=True)
                await self._keep(pin.cid, manifest.size)

    # --- internals -----------------------------------------------------------------------

    async def _put_block(self, cid: CID, data: bytes) -> None:
        stored = await self.ipfs.block_put(data)
        if stored.cid != cid:  # Kubo stored something else than what we sent
            raise CorruptBlockError(f"Kubo named the block {stored.cid}, not {cid}")

    async def _get_block(self, cid: CID) -> bytes:
        data = await self.ipfs.block_get(cid)
        if len(data) > MAX_BLOCK_SIZE:
            raise CorruptBlockError(f"{cid}: {len(data)} bytes, more than a block may hold")
        verify_block(cid, data)
        return data

    async def _manifest(self, cid: CID, *, offline: bool) -> ChunkManifest:
        if cid.codec.name != "dag-cbor":
            raise BadManifestError(f"{cid} is a {cid.codec.name} block, not a DAG-CBOR manifest")
        data = await self.ipfs.block_get(cid, offline=offline)
        verify_block(cid, data)
        return ChunkManifest.decode(data)

    async def _keep(self, cid: CID, size: int) -> None:
        async with self._pinning:
            pinned = cid in self.ledger
            for evicted in self.ledger.touch(cid, size):
                await self._unpin(evicted)
            if not pinned:
                try:
                    await self.ipfs.pin_add(cid, name=self.pin_name)
                except BaseException:
                    self.ledger.forget(cid)
                    raise

    async def _unpin(self, cid: CID) -> None:
        try:
            await self.ipfs.pin_rm(cid)
        except IPFSCommandError as e:
            # Someone unpinned it already: the goal is reached. Kubo says so only in words.
            if "not pinned" not in e.message:
                raise

    async def _each(self, calls: Iterable[Awaitable[T]]) -> list[T]:
        """Runs the calls, `parallel` at a time, and returns their results in order. The first
        failure cancels the others, so no task outlives the operation, and is raised."""

        async def bounded(call: Awaitable[T]) -> T:
            async with self._parallel:
                return await call

        tasks = [asyncio.ensure_future(bounded(call)) for call in calls]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


# --- announcements ---------------------------------------------------------------------------


class Announcement(BaseModel):
    """ "`peer` holds the KV of this token chain under this manifest", signed by `peer`."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    format: AnnouncementFormat = ANNOUNCEMENT_FORMAT
    peer: StrictStr
    model: StrictStr
    token_hashes: tuple[TokenHash, ...] = Field(alias="tokens")
    manifest: Link
    signature: StrictBytes = b""

    def signed_bytes(self) -> bytes:
        """What the signature covers: every field but the signature, as canonical DAG-CBOR
        (sorted keys, shortest integers), so any implementation rebuilds the same bytes."""
        return dag_cbor.encode(self._ipld(signature=False))

    def encode(self) -> bytes:
        return dag_cbor.encode(self._ipld(signature=True))

    @classmethod
    def decode(cls, data: bytes) -> Self:
        try:
            return cls.model_validate(dag_cbor.decode(data))
        except (CBORDecodingError, ValidationError) as e:
            raise BadAnnouncementError(f"not a KV announcement: {e}") from e

    def _ipld(self, *, signature: bool) -> dict[str, Any]:
        fields = self.model_dump(by_alias=True, exclude=set() if signature else {"signature"})
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def announce(
    key: Ed25519PrivateKey,
    *,
    peer: str,
    model: str,
    token_hashes: Sequence[int],
    manifest: CID,
) -> Announcement:
    """A signed announcement that `peer` (whose key `key` is) holds a chunk."""
    unsigned = Announcement(peer=peer, model=model, tokens=tuple(token_hashes), manifest=manifest)
    return unsigned.model_copy(update={"signature": key.sign(unsigned.signed_bytes())})


def verify_announcement(
    announcement: Announcement, trusted_keys: Mapping[str, Ed25519PublicKey]
) -> None:
    """Raises BadAnnouncementError unless the announcing peer's trusted key signed it."""
    key = trusted_keys.get(announcement.peer)
    if key is None:
        raise BadAnnouncementError(f"no trusted key for peer {announcement.peer!r}")
    try:
        key.verify(announcement.signature, announcement.signed_bytes())
    except InvalidSignature as e:
        raise BadAnnouncementError(f"bad signature on {announcement.peer}'s announcement") from e
