"""A stock consumer of vLLM's KV events routes EdgeLLM workers by the prefixes they hold:
vllm-router's `kv_aware` policy (pinned, from PyPI; `tests/vllm_router.py`) in front of four real
llama.cpp workers that publish their KV events, and nothing of EdgeLLM's in between."""

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import zmq

from edgellm.dev.cluster import free_port
from edgellm.kvcache import BlockStored, decode_batch
from edgellm.worker.models import TINY, WORDS, write_model
from tests import vllm_router
from tests.e2e.helpers import Worker, eventually, worker_process

WORKERS = 4
PREFIXES = 2 * WORKERS


@pytest.fixture(scope="module")
def binary() -> Path:
    try:
        return vllm_router.install()
    except vllm_router.VllmRouterUnavailableError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[Worker, str]]]:
    """Workers with their KV-event endpoints, publishing on vLLM's default (empty) topic."""
    model = write_model(tmp_path_factory.mktemp("models") / "tiny-random.gguf", TINY)
    with ExitStack() as stack:
        started = []
        for _ in range(WORKERS):
            port = free_port()
            worker = stack.enter_context(worker_process(model, f"--kv-events=tcp://*:{port}"))
            started.append((worker, f"tcp://127.0.0.1:{port}"))
        yield started


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def router(
    binary: Path, workers: list[tuple[Worker, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """vllm-router's URL and its metrics' URL."""
    port, metrics_port = free_port(), free_port()
    argv = vllm_router.command(
        binary,
        port=port,
        metrics_port=metrics_port,
        workers=[(worker.url, events) for worker, events in workers],
        model=TINY.name,
        policy="kv_aware",
    )
    log = tmp_path_factory.mktemp("vllm-router") / "router.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: _healthy(url), 60, "vllm-router answers /health")
        yield url, f"http://127.0.0.1:{metrics_port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        print(log.read_text(errors="replace")[-4000:])


def _prefix(index: int) -> str:
    """A prompt prefix no other test sends: about 116 tokens, 7 full blocks."""
    words = " ".join(WORDS[(index * 7 + k) % len(WORDS)] for k in range(100))
    return f"conversation {index}: {words}"


def _published(events: zmq.Socket[bytes], blocks: int) -> bool:
    """Whether the worker published a store of `blocks` blocks or more."""
    while events.poll(0):
        batch = decode_batch(events.recv_multipart()[-1])
        stored = sum(len(e.block_hashes) for e in batch.events if isinstance(e, BlockStored))
        if stored >= blocks:
            return True
    return False


def test_kv_aware_sends_each_prompt_to_the_worker_that_holds_its_prefix(
    router: tuple[str, str], workers: list[tuple[Worker, str]]
) -> None:
    url, metrics = router
    hits = []
    with zmq.Context() as context:
        for index in range(PREFIXES):
            worker, endpoint = workers[index % WORKERS]
            prefix = _prefix(index)
            with context.socket(zmq.SUB) as events:
                events.connect(endpoint)
                events.subscribe(b"")
                # Straight to the worker, not through the router: only its KV events can tell
                # the router where the prefix is. Until this subscription is in place, each
                # try first has the worker hold something else, so that the prefix is stored
                # (and published) anew.

                def warmed(url: str = worker.url, text: str = prefix) -> bool:
                    for prompt in ("something else entirely", f"{text} warm"):
                        body = {"model": TINY.name, "prompt": prompt, "max_tokens": 1}
                        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
                        answer.raise_for_status()
                    return _published(events, 6)

                eventually(warmed, 60, f"worker {index % WORKERS} publishes the prefix's blocks")
            body = {"model": TINY.name, "prompt": f"{prefix} a question", "max_tokens": 1}
            answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
            # The prefix's blocks are held by that worker alone: a hit means it was chosen.
            hits.append(answer["usage"]["prompt_tokens_details"]["cached_tokens"] >= 6 * 16)
    # One miss is allowed for a race between the router's subscription and the request; a
    # router blind to the events would hit about one prompt in four.
    assert sum(hits) >= PREFIXES - 1, hits
    # And it chose by the events, each prompt's tokens asked of the workers (`/tokenize`).
    assert vllm_router.placements(metrics).get("hit", 0) >= PREFIXES - 1
