"""The KV of long prompts shared through IPFS between llama.cpp workers of one model.

After a prompt of `min_tokens` or more, the worker's server exports its KV state and hands it
to `IPFSKV.save` in the background: the state is stored as a `KVChunk` in this peer's Kubo
(`KVBlockStore`, pinned within a byte cap), an `Announcement` "these blocks -> this manifest" is
signed with the worker's Ed25519 key and kept (the server's `GET /v1/kv/ipfs/{block_hash}` serves
it), and a KV event with medium IPFS tells the router's index that this peer's IPFS holds the
blocks; a chunk unpinned later is announced removed. A worker given such a URL as `kvFrom` calls
`IPFSKV.fetch`: it verifies the announcement against the keys it trusts, checks that the
announced blocks begin its prompt, fetches the chunk through its own Kubo (every block checked
against its CID, wherever it came from) and returns the state for `import_kv_state`, which
checks the model and the tokens once more.

A peer is named by its key ("ed25519:" and the raw public key in unpadded base64url), so an
announcement names the key that signed it and peers need not agree on names. The trusted-keys
file is YAML (or JSON): a mapping of labels, for people, to PEM public keys.

Errors:

    IPFSKVError     no usable KV in IPFS for this prompt; the cause (an IPFS, block store,
                    HTTP or format error) is chained
"""

import base64
import binascii
import contextlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from edgellm.kvcache import (
    DEFAULT_BLOCK_SIZE,
    MEDIUM_IPFS,
    BlockRemoved,
    BlockStored,
    ExternalBlockHash,
    KVEvent,
    prompt_block_keys,
)
from edgellm.kvcache.blockstore import (
    Announcement,
    BadAnnouncementError,
    BadManifestError,
    BlockStoreError,
    KVBlockStore,
    KVChunk,
    announce,
    verify_announcement,
)
from edgellm.kvcache.index import common_prefix
from edgellm.kvcache.ipfs import IPFSError, as_cid

# What a chunk's bytes are: a whole `LlamaCppBackend.export_kv_state` (the store does not read it).
STATE_LAYOUT: Final = "edgellm/llamacpp-kv-state@1"
ANNOUNCEMENT_PATH: Final = re.compile(r"/v1/kv/ipfs/(\d+)$")
# Bytes: the chain of a 128k-token prompt is 8k hashes, under 200 kB of JSON; a peer sending
# more is not sending an announcement.
ANNOUNCEMENT_LIMIT: Final = 1 << 20
HTTP_TIMEOUT: Final = httpx.Timeout(5.0, connect=2.0)


class IPFSKVError(Exception):
    """No usable KV in IPFS for this prompt."""


# --- keys ------------------------------------------------------------------------------------


def key_id(key: Ed25519PublicKey) -> str:
    """The peer name an announcement signed by `key` carries."""
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "ed25519:" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def public_pem(key: Ed25519PrivateKey) -> str:
    """The public half of `key` as PEM, what other peers put in their trusted-keys file."""
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


def load_or_create_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The Ed25519 private key in the PEM file `path`, or a new one written there (mode 0600);
    and whether it is new. ValueError if the file holds something else."""
    if path.exists():
        key = load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
        return key, False
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with its final mode: the key is never readable by others, not even briefly.
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
        file.write(pem)
    return key, True


def load_trusted_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """The keys of a trusted-keys file (`label: PEM public key`), by the peer names they sign
    as. ValueError if it is not such a file."""
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not YAML: {e}") from e
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected a mapping of labels to PEM public keys")
    trusted = {}
    for label, pem in entries.items():
        try:
            key = load_pem_public_key(str(pem).encode())
        except ValueError as e:
            raise ValueError(f"{path}: {label}: not a PEM public key") from e
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path}: {label}: a {type(key).__name__}, not an Ed25519 key")
        trusted[key_id(key)] = key
    return trusted


# --- announcements on the wire ---------------------------------------------------------------


def announcement_json(announcement: Announcement) -> dict[str, Any]:
    """An announcement as the worker serves it: its fields, the manifest as a CID string and
    the signature in base64 (it covers the DAG-CBOR of the fields, rebuilt by the reader)."""
    return {
        "format": announcement.format,
        "peer": announcement.peer,
        "model": announcement.model,
        "tokens": list(announcement.token_hashes),
        "manifest": str(announcement.manifest),
        "signature": base64.b64encode(announcement.signature).decode(),
    }


def read_announcement(body: object) -> Announcement:
    """The announcement in `announcement_json`'s form; BadAnnouncementError if it is not one.
    Its signature is not checked here."""
    if not isinstance(body, dict):
        raise BadAnnouncementError("not a KV announcement: not a JSON object")
    try:
        fields = {
            **body,
            "manifest": as_cid(body.get("manifest")),
            "signature": base64.b64decode(str(body.get("signature")), validate=True),
        }
        return Announcement.model_validate(fields)
    except (ValueError, binascii.Error) as e:  # pydantic's ValidationError is a ValueError
        raise BadAnnouncementError(f"not a KV announcement: {e}") from e


def announced_block(url: str) -> ExternalBlockHash | None:
    """The block hash of a `/v1/kv/ipfs/{block_hash}` URL; None for any other URL."""
    found = ANNOUNCEMENT_PATH.search(httpx.URL(url).path)
    if found is None or int(found[1]) >= 1 << 64:
        return None
    return ExternalBlockHash(int(found[1]))


# --- what this worker announced --------------------------------------------------------------


class AnnouncementBook:
    """The announcements a worker signed, by the last block of their chains, oldest first, and
    findable by any block of their chains. Pure bookkeeping; the owner bounds it."""

    def __init__(self) -> None:
        self._chains: OrderedDict[ExternalBlockHash, Announcement] = OrderedDict()
        self._holders: dict[ExternalBlockHash, set[ExternalBlockHash]] = {}

    def add(self, announcement: Announcement) -> None:
        chain = [ExternalBlockHash(h) for h in announcement.token_hashes]
        self.remove(chain[-1])
        self._chains[chain[-1]] = announcement
        for block in chain:
            self._holders.setdefault(block, set()).add(chain[-1])

    def remove(self, last: ExternalBlockHash) -> list[ExternalBlockHash]:
        """Forgets the chain ending with `last`; returns its blocks that no other chain holds."""
        announcement = self._chains.pop(last, None)
        if announcement is None:
            return []
        uncovered = []
        for block in dict.fromkeys(ExternalBlockHash(h) for h in announcement.token_hashes):
            holders = self._holders[block]
            holders.discard(last)
            if not holders:
                del self._holders[block]
                uncovered.append(block)
        return uncovered

    def find(self, block: ExternalBlockHash) -> Announcement | None:
        """The announcement with the shortest chain (the fewest bytes to fetch) holding `block`."""
        chains = [self._chains[last] for last in self._holders.get(block, ())]
        return min(chains, key=lambda a: len(a.token_hashes), default=None)

    def items(self) -> Iterator[tuple[ExternalBlockHash, Announcement]]:
        return iter(list(self._chains.items()))

    def __contains__(self, last: object) -> bool:
        return last in self._chains

    def __len__(self) -> int:
        return len(self._chains)


# --- the worker's IPFS KV cache --------------------------------------------------------------


@dataclass(frozen=True)
class Prefix:
    """The full blocks of a prompt that a save covers: their tokens and chained hashes."""

    tokens: list[int]
    chain: list[ExternalBlockHash]


@dataclass(frozen=True)
class Restored:
    """A state fetched from IPFS, of which the first `tokens` tokens begin the prompt."""

    state: bytes
    tokens: int
    manifest: str
    peer: str


class IPFSKV:
    """One worker's KV in IPFS: saving its long prompts' states, serving announcements of
    them, and fetching announced states for its own prompts. Lives on the event loop."""

    def __init__(
        self,
        store: KVBlockStore,
        key: Ed25519PrivateKey,
        trusted: Mapping[str, Ed25519PublicKey],
        *,
        model: str,
        seed: str,
        block_size: int = DEFAULT_BLOCK_SIZE,
        min_tokens: int = 256,
        max_announcements: int = 1024,
        publish: Callable[[Sequence[KVEvent]], None] = lambda _: None,
    ) -> None:
        """`model` names the model and its weights (`LlamaCppBackend.model_id`); `seed` and
        `block_size` are the worker's KV event hashing's; `publish` sends KV events."""
        if min_tokens < block_size:
            raise ValueError(f"min_tokens must be at least one block ({block_size})")
        self.store = store
        self.key = key
        self.peer = key_id(key.public_key())
        self.trusted = trusted
        self.model = model
        self.seed = seed
        self.block_size = block_size
        self.min_tokens = min_tokens
        self.max_announcements = max_announcements
        self.publish = publish
        self.book = AnnouncementBook()
        self._saving: set[ExternalBlockHash] = set()

    async def start(self) -> None:
        """Counts the chunks an earlier run left pinned, so the pin cap holds across restarts;
        their announcements were in memory and are gone, so the cap unpins them first."""
        try:
            await self.store.adopt_pins()
        except (IPFSError, BlockStoreError) as e:
            raise IPFSKVError(f"could not read the pins of {self.store.ipfs.url}: {e}") from e

    async def aclose(self) -> None:
        await self.store.ipfs.aclose()

    def claim(self, tokens: Sequence[int]) -> Prefix | None:
        """The prefix of a prompt's `tokens` to save, now marked as being saved; None if the
        prompt is too short or its blocks are saved or being saved already."""
        if len(tokens) < self.min_tokens:
            return None
        chain = prompt_block_keys(tokens, seed=self.seed, block_size=self.block_size)
        if chain[-1] in self.book or chain[-1] in self._saving:
            return None
        self._saving.add(chain[-1])
        return Prefix(list(tokens[: len(chain) * self.block_size]), chain)

    def release(self, prefix: Prefix) -> None:
        """Gives up a claim without saving (the state could not be had)."""
        self._saving.discard(prefix.chain[-1])

    async def save(self, prefix: Prefix, state: bytes) -> Announcement:
        """Stores a claimed prefix's state (which may hold tokens after it), announces it and
        publishes its blocks as stored in IPFS. IPFSKVError if it cannot be stored."""
        chunk = KVChunk(
            model=self.model,
            token_hashes=tuple(prefix.chain),
            dtype="uint8",
            shape=(len(state),),
            layout=STATE_LAYOUT,
            data=state,
        )
        try:
            manifest = await self.store.put(chunk)
        except (IPFSError, BlockStoreError) as e:
            raise IPFSKVError(f"could not store the KV of {len(prefix.tokens)} tokens: {e}") from e
        finally:
            self._saving.discard(prefix.chain[-1])
        announcement = announce(
            self.key,
            peer=self.peer,
            model=self.model,
            token_hashes=prefix.chain,
            manifest=manifest,
        )
        self.book.add(announcement)
        stored = BlockStored(
            block_hashes=prefix.chain,
            parent_block_hash=None,
            token_ids=prefix.tokens,
            block_size=self.block_size,
            lora_id=None,
            medium=MEDIUM_IPFS,
            lora_name=None,
            extra_keys=[None] * len(prefix.chain),
        )
        for _, old in list(self.book.items())[: len(self.book) - self.max_announcements]:
            # Unannounced, a chunk only takes pin space. The store stops counting it first, so
            # a failed unpin leaves it pinned but forgotten here too.
            with contextlib.suppress(IPFSError):
                await self.store.delete(old.manifest)
        self.publish([stored, *self._forget_unpinned()])
        return announcement

    def announcement(self, block: ExternalBlockHash) -> Announcement | None:
        """The announcement of a chain that holds `block`, if this worker keeps one."""
        return self.book.find(block)

    async def fetch(self, url: str, tokens: Sequence[int]) -> Restored:
        """The state an announcement at `url` names, for a prompt of `tokens`, checked as the
        module docstring says; IPFSKVError, with the cause, when it cannot be used."""
        try:
            announcement = read_announcement(await _get_json(url))
            verify_announcement(announcement, self.trusted)
            if announcement.model != self.model:
                raise BadAnnouncementError(f"the KV is of {announcement.model}, not {self.model}")
            keys = prompt_block_keys(tokens, seed=self.seed, block_size=self.block_size)
            shared = common_prefix(announcement.token_hashes, keys)
            if shared == 0:
                raise BadAnnouncementError("the announced blocks do not begin this prompt")
            chunk = await self.store.get(announcement.manifest)
            if (chunk.model, chunk.token_hashes, chunk.layout) != (
                announcement.model,
                announcement.token_hashes,
                STATE_LAYOUT,
            ):
                await self.store.delete(announcement.manifest)  # nobody will want it
                raise BadManifestError(f"{announcement.manifest} is not the chunk announced")
        except (httpx.HTTPError, ValueError, IPFSError, BlockStoreError) as e:
            raise IPFSKVError(str(e)) from e
        finally:
            # Pinning what was fetched may have unpinned chunks this worker announced.
            self.publish(self._forget_unpinned())
        return Restored(
            state=chunk.data,
            tokens=shared * self.block_size,
            manifest=str(announcement.manifest),
            peer=announcement.peer,
        )

    def _forget_unpinned(self) -> list[KVEvent]:
        """Forgets the announcements whose chunks the store no longer pins; the events that
        say which blocks this peer's IPFS no longer holds."""
        removed: list[ExternalBlockHash] = []
        for last, announcement in self.book.items():
            if announcement.manifest not in self.store.ledger:
                removed += self.book.remove(last)
        return [BlockRemoved(block_hashes=removed, medium=MEDIUM_IPFS)] if removed else []


async def _get_json(url: str) -> object:
    """The JSON body of a GET, refused past ANNOUNCEMENT_LIMIT bytes."""
    async with (
        httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http,
        http.stream("GET", url) as response,
    ):
        response.raise_for_status()
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > ANNOUNCEMENT_LIMIT:
                raise BadAnnouncementError(f"the announcement at {url} is over 1 MiB")
    try:
        return json.loads(body)
    except ValueError as e:
        raise BadAnnouncementError(f"the announcement at {url} is not JSON") from e
