"""A typed async client for Kubo's HTTP RPC (`POST /api/v0/<command>`): the IPFS daemon each
peer runs beside its workers, through which KV blocks travel between peers.

The KV block store (`blockstore.py`) stores and fetches KV chunks through it, and the e2e tests
drive real daemons with it. It covers what EdgeLLM uses: raw blocks, UnixFS add/cat, DAG-CBOR
nodes, pins, provider records, swarm connections and the daemon's identity. Argument names and
answers follow Kubo 0.42's RPC reference (docs.ipfs.tech/reference/kubo/rpc).

Errors, with the underlying exception chained:

    IPFSError                   anything the daemon could not do for us
    ├── IPFSUnavailableError    no answer in time: refused, reset or timed out, retries spent
    └── IPFSCommandError        Kubo answered with an error (`.message` is its text), or with
        │                       something this client cannot read
        └── IPFSNotFoundError   the content is not on this daemon (offline) or did not arrive
                                from the swarm before the deadline

A call has one deadline, `timeout`, shared by its attempts. A transport failure is retried with
exponential backoff while time remains, if the request cannot have reached Kubo (refused
connection) or if running it twice does no harm (reads, and writes of content-addressed data);
an answer from Kubo, error or not, is final.
"""

import asyncio
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Annotated, Any, Literal, Self, TypeVar

import dag_cbor
import httpx
from dag_cbor.decoding import CBORDecodingError
from dag_cbor.ipld import IPLDKind
from multiformats import CID
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

DEFAULT_API_URL = "http://127.0.0.1:5001"
# Requests that never reached Kubo: safe to resend whatever the command.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Kubo may have run the command before the failure: resend only idempotent ones.
_MAYBE_RUN = (
    httpx.ReadError,
    httpx.WriteError,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.RemoteProtocolError,
)
_MAX_BACKOFF = 2.0  # seconds: a restarting daemon is back in about one
# Kubo's own deadline (its `timeout` option) ends a network search a little before ours, so a
# block that never arrives is reported by Kubo as such rather than as a silent daemon.
_KUBO_DEADLINE_MARGIN = 0.5
# Kubo sets no distinct error code for a miss (Code is 0): these are its messages for one.
_NOT_FOUND_MESSAGES = ("not found", "could not find", "context deadline exceeded")
# Kubo's routing event types (core/commands/routing.go); 4 carries providers.
_ROUTING_EVENT_PROVIDER = 4

CIDLike = CID | str
PinType = Literal["direct", "indirect", "recursive", "all"]


class IPFSError(Exception):
    """The IPFS daemon could not do what was asked."""


class IPFSUnavailableError(IPFSError):
    """The daemon did not answer: it is down, unreachable or hung."""


class IPFSCommandError(IPFSError):
    def __init__(self, command: str, message: str, status: int | None = None) -> None:
        self.command, self.message, self.status = command, message, status
        super().__init__(f"ipfs {command.replace('/', ' ')}: {message}")


class IPFSNotFoundError(IPFSCommandError):
    pass


def as_cid(value: object) -> CID:
    """A CID, or one from its string form (any multibase, v0 or v1); ValueError otherwise."""
    if isinstance(value, CID):
        return value
    if not isinstance(value, str):
        raise ValueError(f"not a CID: {value!r}")
    try:
        return CID.decode(value)
    except (KeyError, ValueError) as e:  # multiformats raises both, for different faults
        raise ValueError(f"not a CID: {value!r} ({e})") from e


# Kubo's answers, read with Kubo's field names and exposed under ours.
KuboCID = Annotated[CID, BeforeValidator(as_cid)]


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)


class BlockStat(_Answer):
    cid: KuboCID = Field(alias="Key")
    size: int = Field(alias="Size")


class AddedFile(_Answer):
    cid: KuboCID = Field(alias="Hash")
    name: str = Field(alias="Name")
    size: int = Field(alias="Size")  # the UnixFS DAG's size, a little more than the file's


class Pin(_Answer):
    cid: KuboCID = Field(alias="Cid")
    type: str = Field(alias="Type")
    name: str = Field("", alias="Name")


class RemovedBlock(_Answer):
    cid: KuboCID = Field(alias="Hash")
    error: str | None = Field(None, alias="Error")  # why Kubo kept it (pinned, absent)


class Provider(_Answer):
    peer_id: str = Field(alias="ID")
    addresses: tuple[str, ...] = Field((), alias="Addrs")


class SwarmPeer(_Answer):
    peer_id: str = Field(alias="Peer")
    address: str = Field(alias="Addr")


class PeerIdentity(_Answer):
    peer_id: str = Field(alias="ID")
    public_key: str = Field(alias="PublicKey")
    addresses: tuple[str, ...] = Field((), alias="Addresses")
    agent_version: str = Field(alias="AgentVersion")
    protocols: tuple[str, ...] = Field((), alias="Protocols")


class _Link(_Answer):
    cid: KuboCID = Field(alias="/")  # DAG-JSON's form of a link


class _DagPutAnswer(_Answer):
    link: _Link = Field(alias="Cid")


class _RoutingEvent(_Answer):
    type: int = Field(alias="Type")
    responses: list[Provider] | None = Field(None, alias="Responses")


class _SwarmPeers(_Answer):
    peers: list[SwarmPeer] | None = Field(None, alias="Peers")


class KuboClient:
    """One Kubo daemon's RPC API.

    Written on httpx rather than `ipfshttpclient`, the old Python client: it refuses every Kubo
    from 0.8 on and has had no release since May 2021 (0.8.0a2). `transport` swaps httpx's I/O,
    e.g. for a proxy that tampers with answers in integrity tests.
    """

    def __init__(
        self,
        url: str = DEFAULT_API_URL,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.1,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("timeout must be positive, retries and backoff not negative")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._http = httpx.AsyncClient(base_url=f"{self.url}/api/v0/", transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- blocks ----------------------------------------------------------------------------

    async def block_put(
        self,
        data: bytes,
        *,
        codec: str = "raw",
        hash_function: str = "sha2-256",
        pin: bool = False,
    ) -> BlockStat:
        """Stores one block (at most 1 MiB, or bitswap will not carry it) and returns its CID."""
        response = await self._call(
            "block/put",
            {"cid-codec": codec, "mhtype": hash_function, "pin": pin},
            data=data,
        )
        return _read("block/put", response, BlockStat)

    async def block_get(self, cid: CIDLike, *, offline: bool = False) -> bytes:
        """A block's bytes, fetched from the swarm unless `offline`. Kubo checks them against
        the CID only when it fetches them; callers that cannot trust the path check again."""
        response = await self._call("block/get", {"arg": str(cid)}, offline=offline, searches=True)
        return response.content

    async def block_stat(self, cid: CIDLike, *, offline: bool = False) -> BlockStat:
        response = await self._call("block/stat", {"arg": str(cid)}, offline=offline, searches=True)
        return _read("block/stat", response, BlockStat)

    async def block_rm(self, *cids: CIDLike) -> list[RemovedBlock]:
        """Removes local blocks; Kubo keeps pinned ones and says why, per block."""
        response = await self._call("block/rm", {"arg": [str(c) for c in cids]}, idempotent=False)
        return _read_lines("block/rm", response, RemovedBlock)

    # --- files -----------------------------------------------------------------------------

    async def add(
        self,
        data: bytes,
        *,
        name: str = "data",
        pin: bool = True,
        cid_version: int = 1,
    ) -> AddedFile:
        """Adds bytes as a UnixFS file (CIDv1 and raw leaves by default) and returns its root."""
        response = await self._call(
            "add",
            {"pin": pin, "cid-version": cid_version},
            data=data,
            filename=name,
        )
        added = _read_lines("add", response, AddedFile)
        if not added:
            raise IPFSCommandError("add", "the answer names no file")
        return added[-1]  # the root; earlier lines would be its directories' entries

    async def cat(self, path: CIDLike) -> bytes:
        """A UnixFS file's bytes, by CID or IPFS path."""
        response = await self._call("cat", {"arg": str(path)}, searches=True)
        # Past the first byte Kubo reports a failure only in an HTTP trailer, which httpx does
        # not read: a short body is the sign of one.
        expected = response.headers.get("X-Content-Length")
        if expected is not None and int(expected) != len(response.content):
            got = len(response.content)
            raise IPFSNotFoundError("cat", f"got {got} of {expected} bytes of {path}")
        return response.content

    # --- DAG-CBOR --------------------------------------------------------------------------

    async def dag_put(self, node: IPLDKind, *, pin: bool = False) -> CID:
        """Stores an IPLD node as DAG-CBOR and returns its CID (dag-cbor codec, sha2-256)."""
        response = await self._call(
            "dag/put",
            {"input-codec": "dag-cbor", "store-codec": "dag-cbor", "pin": pin},
            data=dag_cbor.encode(node),
        )
        return _read("dag/put", response, _DagPutAnswer).link.cid

    async def dag_get(self, cid: CIDLike, *, offline: bool = False) -> IPLDKind:
        response = await self._call(
            "dag/get",
            {"arg": str(cid), "output-codec": "dag-cbor"},
            offline=offline,
            searches=True,
        )
        try:
            return dag_cbor.decode(response.content)
        except CBORDecodingError as e:
            raise IPFSCommandError("dag/get", f"not DAG-CBOR: {e}") from e

    # --- pins ------------------------------------------------------------------------------

    async def pin_add(
        self,
        cid: CIDLike,
        *,
        recursive: bool = True,
        name: str | None = None,
    ) -> None:
        """Pins a CID (with everything it links to, if recursive), fetching what is missing."""
        params: dict[str, Any] = {"arg": str(cid), "recursive": recursive}
        if name is not None:
            params["name"] = name
        await self._call("pin/add", params, searches=True)

    async def pin_rm(self, cid: CIDLike, *, recursive: bool = True) -> None:
        """Unpins a CID; IPFSCommandError if it was not pinned that way."""
        await self._call(
            "pin/rm",
            {"arg": str(cid), "recursive": recursive},
            idempotent=False,
        )

    async def pin_ls(
        self,
        *cids: CIDLike,
        type: PinType = "all",
        name: str | None = None,
    ) -> list[Pin]:
        """The pins of the given CIDs (IPFSCommandError if one is not pinned), or of all, of
        one type; `name` keeps those whose name contains it."""
        params: dict[str, Any] = {"type": type, "names": True, "stream": True}
        if cids:
            params["arg"] = [str(c) for c in cids]
        if name is not None:
            params["name"] = name
        return _read_lines("pin/ls", await self._call("pin/ls", params), Pin)

    # --- routing and swarm -----------------------------------------------------------------

    async def provide(self, cid: CIDLike, *, recursive: bool = False) -> None:
        """Announces to the DHT that this daemon provides a CID (Kubo may batch it)."""
        await self._call(
            "routing/provide",
            {"arg": str(cid), "recursive": recursive},
            searches=True,
        )

    async def find_providers(self, cid: CIDLike, *, limit: int = 20) -> list[Provider]:
        """The peers the DHT says provide a CID: up to `limit`, or those found in time."""
        response = await self._call(
            "routing/findprovs",
            {"arg": str(cid), "num-providers": limit},
            searches=True,
        )
        providers: dict[str, Provider] = {}
        for event in _read_lines("routing/findprovs", response, _RoutingEvent):
            if event.type == _ROUTING_EVENT_PROVIDER:
                providers.update((p.peer_id, p) for p in event.responses or [])
        return list(providers.values())

    async def swarm_connect(self, address: str) -> None:
        """Connects to a peer by multiaddr (`/ip4/.../tcp/.../p2p/<peer id>`)."""
        await self._call("swarm/connect", {"arg": address})

    async def swarm_peers(self) -> list[SwarmPeer]:
        response = await self._call("swarm/peers", {})
        return _read("swarm/peers", response, _SwarmPeers).peers or []

    async def id(self) -> PeerIdentity:
        """The daemon's peer identity, as `ipfs id` shows it."""
        return _read("id", await self._call("id", {}), PeerIdentity)

    # --- transport -------------------------------------------------------------------------

    async def _call(
        self,
        command: str,
        params: Mapping[str, Any],
        *,
        data: bytes | None = None,
        filename: str = "data",
        offline: bool = False,
        searches: bool = False,
        idempotent: bool = True,
    ) -> httpx.Response:
        """POSTs one command and returns Kubo's successful answer, retrying as the module
        docstring says. `searches` marks commands that may wait on the swarm: Kubo gets its
        own deadline for them, so a miss comes back as IPFSNotFoundError."""
        deadline = time.monotonic() + self.timeout
        query = {key: _query_value(value) for key, value in params.items()}
        if offline:
            query["offline"] = "true"
        if searches and not offline:
            query["timeout"] = f"{max(self.timeout - _KUBO_DEADLINE_MARGIN, 0.1):.3f}s"
        files = None if data is None else {"file": (filename, data, "application/octet-stream")}
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                response = await self._http.post(
                    command, params=query, files=files, timeout=max(remaining, 0.001)
                )
            except httpx.TransportError as e:
                pause = min(self.backoff * 2**attempt, _MAX_BACKOFF)
                retryable = isinstance(e, _NOT_SENT) or (idempotent and isinstance(e, _MAYBE_RUN))
                if not retryable or attempt >= self.retries or remaining - pause <= 0:
                    raise IPFSUnavailableError(
                        f"ipfs {command.replace('/', ' ')}: no answer from {self.url} in "
                        f"{attempt + 1} attempts ({type(e).__name__}: {e})"
                    ) from e
                attempt += 1
                await asyncio.sleep(pause)
                continue
            if response.status_code != httpx.codes.OK:
                raise _command_error(command, response)
            return response


A = TypeVar("A", bound=_Answer)


def _read(command: str, response: httpx.Response, answer: type[A]) -> A:
    try:
        return answer.model_validate_json(response.content)
    except ValidationError as e:
        raise IPFSCommandError(command, f"unexpected answer {response.text[:200]!r}") from e


def _read_lines(command: str, response: httpx.Response, answer: type[A]) -> list[A]:
    """Kubo's streamed answers: one JSON object per line."""
    try:
        return [answer.model_validate_json(line) for line in response.content.splitlines()]
    except ValidationError as e:
        raise IPFSCommandError(command, f"unexpected answer {response.text[:200]!r}") from e


def _command_error(command: str, response: httpx.Response) -> IPFSCommandError:
    try:
        message = str(response.json()["Message"])
    except (ValueError, KeyError, TypeError):
        message = response.text.strip() or response.reason_phrase  # e.g. 404 for old Kubos
    if any(text in message for text in _NOT_FOUND_MESSAGES):
        return IPFSNotFoundError(command, message, response.status_code)
    return IPFSCommandError(command, message, response.status_code)


def _query_value(value: Any) -> Any:
    # Kubo reads booleans as "true"/"false", not Python's "True".
    if isinstance(value, bool):
        return "true" if value else "false"
    return value
