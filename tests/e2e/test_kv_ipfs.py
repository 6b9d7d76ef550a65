"""The KV of a long prompt saved to IPFS by one real llama.cpp worker, announced, and loaded by
another through its own Kubo daemon; three real Kubo daemons in a private swarm on loopback,
each worker with its own."""

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
import zmq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgellm.dev.cluster import free_port
from edgellm.dev.ipfs import LocalSwarm
from edgellm.kvcache import (
    MEDIUM_IPFS,
    BlockRemoved,
    BlockStored,
    KVEvent,
    decode_batch,
    prompt_block_keys,
)
from edgellm.kvcache.blockstore import Announcement, KVBlockStore, announce
from edgellm.kvcache.ipfs import KuboClient
from edgellm.worker.ipfskv import (
    announcement_json,
    key_id,
    load_or_create_key,
    public_pem,
    read_announcement,
)
from edgellm.worker.models import TINY, WORDS, write_model
from tests.e2e.helpers import eventually, worker_process

T = TypeVar("T")
GREEDY = {"model": "tiny-random", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
PIN_CAP = 1 << 20  # bytes: a few states of 600-token prompts of the tiny model
SEED = "0"
NOW = "2026-01-01T00:00:00Z"


def prompt(label: str, words: int = 600) -> str:
    """A long prompt of its own: the tiny model reads most words as one token."""
    chosen = random.Random(label).choices(WORDS, k=words)
    return f"{label} " + " ".join(chosen)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny-random.gguf", TINY)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("ipfs"), 3) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="module")
def key_a(keys: Path) -> Ed25519PrivateKey:
    """Worker A's key, made before A starts so that B can trust it from its first request."""
    key, _ = load_or_create_key(keys / "a.pem")
    return key


class Peer:
    def __init__(self, url: str, events: zmq.Socket[bytes], publisher: str) -> None:
        self.url = url
        self.events = events
        self.publisher = publisher  # its KV events' endpoint, for routers to follow
        self.seen: list[KVEvent] = []

    def generate(self, text: str, **fields: Any) -> dict[str, Any]:
        body = {**GREEDY, "prompt": text, **fields}
        response = httpx.post(f"{self.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def blocks(self, text: str) -> list[int]:
        response = httpx.post(f"{self.url}/tokenize", json={"prompt": text}, timeout=30)
        return list(prompt_block_keys(response.json()["tokens"], seed=SEED))

    def announced(self, block: int) -> dict[str, Any] | None:
        response = httpx.get(f"{self.url}/v1/kv/ipfs/{block}", timeout=10)
        if response.status_code == 404:
            assert response.json()["error"]["type"] == "not_found_error"
            return None
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    def metric(self, line: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])

    def transfers(self, outcome: str, source: str = "ipfs") -> float:
        labels = f'outcome="{outcome}",source="{source}"'
        return self.metric(f"edgellm_worker_kv_transfers_total{{{labels}}}")

    def ipfs_events(self) -> list[KVEvent]:
        """Every KV event with medium IPFS received so far."""
        while self.events.poll(0):
            batch = decode_batch(self.events.recv_multipart()[2])
            self.seen += [e for e in batch.events if getattr(e, "medium", None) == MEDIUM_IPFS]
        return self.seen


def _worker(model: Path, node: str, key: Path, *options: str) -> Iterator[Peer]:
    port = free_port()
    with (
        worker_process(
            model,
            f"--ipfs-api={node}",
            f"--ipfs-key={key}",
            f"--kv-events=tcp://*:{port}",
            f"--hash-seed={SEED}",
            *options,
        ) as worker,
        zmq.Context() as context,
        context.socket(zmq.SUB) as sub,
    ):
        sub.connect(f"tcp://127.0.0.1:{port}")
        sub.subscribe(b"")
        yield Peer(worker.url, sub, f"tcp://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def worker_a(
    model: Path, swarm: LocalSwarm, keys: Path, key_a: Ed25519PrivateKey
) -> Iterator[Peer]:
    yield from _worker(model, swarm.nodes[0].api_url, keys / "a.pem", f"--ipfs-pin-cap={PIN_CAP}")


@pytest.fixture(scope="module")
def worker_b(
    model: Path, swarm: LocalSwarm, keys: Path, key_a: Ed25519PrivateKey
) -> Iterator[Peer]:
    """Trusts A's key; its own key does not exist yet, so it creates one."""
    trusted = keys / "b-trusted.yaml"
    trusted.write_text(json.dumps({"worker-a": public_pem(key_a)}))
    yield from _worker(model, swarm.nodes[1].api_url, keys / "b.pem", f"--ipfs-trusted={trusted}")


@pytest.fixture(scope="module")
def forger() -> Iterator[Callable[[dict[str, Any]], str]]:
    """A tiny HTTP server that serves whatever announcement a test gives it, at a URL of the
    worker API's form."""
    served: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = served.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body or b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def serve(announcement: dict[str, Any]) -> str:
        path = f"/v1/kv/ipfs/{announcement['tokens'][-1]}"
        served[path] = json.dumps(announcement).encode()
        return f"http://127.0.0.1:{server.server_port}{path}"

    try:
        yield serve
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def kubo(url: str, call: Callable[[KVBlockStore], Coroutine[Any, Any, T]]) -> T:
    """Runs `call` on a block store of the daemon at `url` (its own pin name: the test's)."""

    async def run() -> T:
        async with KuboClient(url) as ipfs:
            return await call(KVBlockStore(ipfs, pin_cap_bytes=1 << 30, pin_name="test"))

    return asyncio.run(run())


def saved(peer: Peer, text: str) -> tuple[list[int], Announcement]:
    """Serves `text` on `peer` and waits until it announces the prompt's KV in IPFS."""
    peer.generate(text)
    chain = peer.blocks(text)
    found = eventually(lambda: peer.announced(chain[-1]), 30, "the prompt's KV is announced")
    return chain, read_announcement(found)


def test_a_long_prompt_served_on_one_worker_is_loaded_from_ipfs_by_another(
    worker_a: Peer, worker_b: Peer, key_a: Ed25519PrivateKey
) -> None:
    text = prompt("loaded")
    recomputed = worker_b.generate(text)
    assert recomputed["usage"]["prompt_tokens"] >= 512
    worker_b.generate("hello world")  # B's context no longer holds the prompt

    chain, announcement = saved(worker_a, text)
    assert announcement.peer == key_id(key_a.public_key())
    assert list(announcement.token_hashes) == chain
    key_a.public_key().verify(announcement.signature, announcement.signed_bytes())
    stored = eventually(
        lambda: [e for e in worker_a.ipfs_events() if isinstance(e, BlockStored)],
        10,
        "A publishes its IPFS blocks",
    )
    assert any(list(e.block_hashes) == chain for e in stored)

    loaded_before = worker_b.transfers("loaded")
    url = f"{worker_a.url}/v1/kv/ipfs/{chain[-1]}"
    decoded = worker_b.generate(text, kv_from=url)

    transfer = decoded.get("kv_transfer")
    assert transfer is not None
    assert transfer["source"] == "ipfs"
    assert transfer["tokens"] == len(chain) * 16
    assert transfer["manifest"] == str(announcement.manifest)
    assert decoded["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(chain) * 16
    assert decoded["choices"][0]["text"] == recomputed["choices"][0]["text"]
    assert decoded["usage"]["completion_tokens"] == GREEDY["max_tokens"]
    assert worker_b.transfers("loaded") == loaded_before + 1
    assert worker_b.metric('edgellm_worker_ipfs_bytes_total{direction="get"}') >= transfer["bytes"]
    assert worker_b.metric("edgellm_worker_ipfs_fetch_duration_seconds_count") >= 1
    assert worker_a.metric('edgellm_worker_ipfs_bytes_total{direction="put"}') > 0


def test_a_shorter_prompt_sharing_the_prefix_loads_the_shared_blocks(
    worker_a: Peer, worker_b: Peer
) -> None:
    text = prompt("shared", 700)
    chain, _ = saved(worker_a, text)
    shorter = " ".join(text.split()[:400])
    blocks = worker_b.blocks(shorter)
    assert blocks == chain[: len(blocks)]
    recomputed = worker_b.generate(shorter)
    worker_b.generate("hello world")

    decoded = worker_b.generate(shorter, kv_from=f"{worker_a.url}/v1/kv/ipfs/{blocks[-1]}")

    assert decoded["kv_transfer"]["tokens"] == len(blocks) * 16
    assert decoded["choices"][0]["text"] == recomputed["choices"][0]["text"]


def _refused(worker: Peer, text: str, url: str) -> None:
    failed_before = worker.transfers("failed")
    decoded = worker.generate(text, kv_from=url)
    assert decoded.get("kv_transfer") is None, url
    assert decoded["usage"]["completion_tokens"] == GREEDY["max_tokens"]
    assert worker.transfers("failed") == failed_before + 1, url


def test_a_chunk_substituted_under_a_forged_announcement_is_refused_and_recomputed(
    worker_a: Peer,
    worker_b: Peer,
    swarm: LocalSwarm,
    key_a: Ed25519PrivateKey,
    forger: Callable[[dict[str, Any]], str],
) -> None:
    text = prompt("forged")
    chain, announcement = saved(worker_a, text)
    b_api = swarm.nodes[1].api_url
    real = kubo(b_api, lambda store: store.get(announcement.manifest))
    # The state's bytes with their end flipped, stored in B's own daemon (so every CID is
    # right) and announced as A would, with A's own key.
    tampered = replace(real, data=real.data[:-64] + bytes(b ^ 0xFF for b in real.data[-64:]))
    manifest = kubo(b_api, lambda store: store.put(tampered))
    forged = announce(
        key_a,
        peer=announcement.peer,
        model=announcement.model,
        token_hashes=chain,
        manifest=manifest,
    )
    _refused(worker_b, text, forger(announcement_json(forged)))

    # A true chunk of another chain, announced for this one.
    other_chain, other = saved(worker_a, prompt("another"))
    lying = announce(
        key_a, peer=other.peer, model=other.model, token_hashes=chain, manifest=other.manifest
    )
    _refused(worker_b, text, forger(announcement_json(lying)))

    assert other_chain != chain

    # A's true announcement with one bit of its signature changed.
    signature = bytearray(announcement.signature)
    signature[0] ^= 1
    broken = announcement.model_copy(update={"signature": bytes(signature)})
    _refused(worker_b, text, forger(announcement_json(broken)))


def test_an_announcement_signed_by_an_untrusted_key_is_ignored(
    worker_a: Peer, worker_b: Peer, forger: Callable[[dict[str, Any]], str]
) -> None:
    text = prompt("untrusted")
    chain, announcement = saved(worker_a, text)
    stranger = Ed25519PrivateKey.generate()
    resigned = announce(
        stranger,
        peer=key_id(stranger.public_key()),
        model=announcement.model,
        token_hashes=chain,
        manifest=announcement.manifest,
    )
    _refused(worker_b, text, forger(announcement_json(resigned)))


def test_the_pin_cap_holds_under_a_stream_of_new_prefixes(
    worker_a: Peer, swarm: LocalSwarm
) -> None:
    a_api = swarm.nodes[0].api_url

    async def pinned(store: KVBlockStore) -> int:
        """The data bytes of the chunks A's store pins, as their manifests say."""
        total = 0
        for pin in await store.ipfs.pin_ls(type="recursive", name="edgellm-kv"):
            node = await store.ipfs.dag_get(pin.cid)
            assert isinstance(node, dict)
            size = node["size"]
            assert isinstance(size, int)
            total += size
        return total

    chains = []
    for index in range(8):
        chain, _ = saved(worker_a, prompt(f"stream-{index}"))
        chains.append(chain)
        assert kubo(a_api, pinned) <= PIN_CAP
    assert worker_a.announced(chains[0][-1]) is None, "the oldest chunk was unpinned"
    assert worker_a.announced(chains[-1][-1]) is not None
    removed = eventually(
        lambda: {
            h for e in worker_a.ipfs_events() if isinstance(e, BlockRemoved) for h in e.block_hashes
        },
        10,
        "A publishes the blocks its IPFS no longer holds",
    )
    assert chains[0][-1] in removed


def test_with_its_ipfs_daemon_stopped_a_worker_recomputes_and_answers(
    worker_a: Peer, worker_b: Peer, swarm: LocalSwarm
) -> None:
    text = prompt("daemon-down")
    chain, _ = saved(worker_a, text)
    swarm.stop(1)
    try:
        started = time.monotonic()
        _refused(worker_b, text, f"{worker_a.url}/v1/kv/ipfs/{chain[-1]}")
        assert time.monotonic() - started < 30
    finally:
        swarm.start(1)


def _peer_body(name: str, peer: Peer, running: int) -> dict[str, Any]:
    """The PeerNode `edgellm join` would write for `peer`, for a router's --peers-file."""
    ready = {"type": "Ready", "status": "True", "reason": "Up", "lastTransitionTime": NOW}
    return {
        "apiVersion": "edgellm.io/v1alpha1",
        "kind": "PeerNode",
        "metadata": {"name": name, "resourceVersion": "1"},
        "spec": {
            "cluster": "home",
            "endpoint": peer.url,
            "roles": ["prefill", "decode"],
            "backends": ["llamacpp"],
            "resources": {"cpu": "2", "memory": "4Gi"},
            "models": [{"name": TINY.name, "format": "gguf"}],
            "kvEvents": {"endpoint": peer.publisher},
        },
        "status": {"conditions": [ready], "load": {"runningRequests": running}},
    }


def test_a_router_sends_a_prompt_whose_prefix_is_in_ipfs_to_load_it_there(
    worker_a: Peer, worker_b: Peer, tmp_path: Path
) -> None:
    peers = tmp_path / "peers.yaml"
    # A is busy: the router prefers idle B, which must then load A's KV rather than compute.
    bodies = [_peer_body("announcer", worker_a, running=3), _peer_body("loader", worker_b, 0)]
    peers.write_text(yaml.safe_dump_all(bodies))
    port = free_port()
    with (tmp_path / "router.log").open("wb") as log:
        router = subprocess.Popen(
            [
                *(sys.executable, "-m", "edgellm", "router", f"--peers-file={peers}"),
                *("--anonymous", f"--port={port}", f"--hash-seed={SEED}", "--verbose"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: _answers(f"{url}/healthz"), 60, "the router answers")
        text = prompt("routed")
        chain, _ = saved(worker_a, text)
        asked = {"model": TINY.name, "prompt": text + " and more", "max_tokens": 4}

        def in_ipfs() -> bool:
            found = httpx.post(f"{url}/v1/kv/lookup", json=asked, timeout=30).json()["inIPFS"]
            return bool(found == {"peer": "announcer", "blocks": len(chain)})

        eventually(in_ipfs, 30, "the router's index holds A's announced prefix in IPFS")
        loaded = worker_b.transfers("loaded")
        answer = httpx.post(f"{url}/v1/completions", json=asked, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-edgellm-peer"] == "loader"
        cached = answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= len(chain) * 16
        assert worker_b.transfers("loaded") == loaded + 1
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'edgellm_router_kv_loads_total{source="ipfs"} 1.0' in metrics
    finally:
        router.terminate()
        router.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
