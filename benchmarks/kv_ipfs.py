"""IPFS KV benchmark (issue #6): how fast KV chunks move through Kubo on loopback, and whether a
worker loading a long prompt's KV from a peer's IPFS beats computing it itself.

Everything runs over a two-daemon private swarm (`LocalSwarm`) on loopback.

1. Block store: `KVBlockStore` put and get of random chunks of each of `--chunk-mib`'s sizes:
   put on daemon A, get on A (local), get on B (over bitswap: every repeat stores a fresh chunk,
   so B holds none of it), each repeated and reported as median MiB/s beside a copy of the same
   bytes in memory and one through a loopback TCP socket.
2. Restore against recompute: two real `edgellm worker`s of the generated bench model (the
   medium one, 8k context), each with its own daemon (`--ipfs-api`), its own key, and the other's
   key trusted. For each prefix size and repeat, a fresh prompt of that many tokens (counted by
   the worker's `/v1/tokenize`): A generates one token for it and saves its KV to IPFS (we wait
   until A announces it); then B, its context holding an unrelated prompt each time, generates
   one token for it with `kv_from` set to A's announcement (restore: it must come from IPFS) and
   then without (recompute). Per size: median wall times (client clock), the transfer's own
   seconds and bytes, and restore / recompute. DESIGN's target: restore under 0.2x of
   recompute at 4k tokens.

Progress goes to stderr; the figures are printed and written as JSON to --out.

    python -m benchmarks.kv_ipfs --out bench-results/kv-ipfs.json
    python -m benchmarks.kv_ipfs --smoke --out bench-results/kv-ipfs-smoke.json
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import BenchmarkError, Completed, Processes, complete, say, until
from edgellm.dev.cluster import free_port
from edgellm.dev.ipfs import LocalSwarm
from edgellm.kvcache import ExternalBlockHash, prompt_block_keys
from edgellm.kvcache.blockstore import KVBlockStore, KVChunk
from edgellm.kvcache.ipfs import KuboClient
from edgellm.worker.ipfskv import load_or_create_key, public_pem
from edgellm.worker.models import BENCH, WORDS, write_model
from edgellm.workerapi import WorkerError
from edgellm.workerapi.protocol import CompletionRequest

Body = dict[str, Any]
MIB = 1 << 20
SEED = "0"  # the workers' default --hash-seed
TARGET_TOKENS = 4096
TARGET_RATIO = 0.2  # DESIGN: restoring 4k tokens' KV takes under 0.2x of computing it


@dataclass(frozen=True)
class Size:
    chunk_mib: tuple[int, ...]
    store_repeats: int
    prefixes: tuple[int, ...]  # prompt tokens
    repeats: int  # fresh prompts per prefix size


FULL = Size((4, 16), 5, (512, 2048, 4096), 3)
SMOKE = Size((4, 16), 2, (512, 1024), 2)


def _mib_per_s(size: int, seconds: list[float]) -> float:
    return round(size / MIB / statistics.median(seconds), 1)


def _median(values: list[float], digits: int = 4) -> float:
    return round(statistics.median(values), digits)


# --- 1. block store -----------------------------------------------------------------------


def memory_copy(data: bytes) -> float:
    started = time.perf_counter()
    copied = bytearray(data)
    seconds = time.perf_counter() - started
    assert len(copied) == len(data)
    return seconds


def loopback_copy(data: bytes) -> float:
    """Seconds to send `data` through a loopback TCP connection into a buffer at the other end."""
    received = bytearray(len(data))
    count = [0]
    with socket.create_server(("127.0.0.1", 0)) as server:

        def receive() -> None:
            connection, _ = server.accept()
            with connection:
                view = memoryview(received)
                while read := connection.recv_into(view[count[0] :]):
                    count[0] += read

        thread = threading.Thread(target=receive)
        thread.start()
        started = time.perf_counter()
        with socket.create_connection(server.getsockname()[:2]) as client:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            thread.join()
        seconds = time.perf_counter() - started
    if count[0] != len(data):
        raise BenchmarkError(f"the loopback copy received {count[0]} of {len(data)} bytes")
    return seconds


async def _timed(call: Awaitable[Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = await call
    return result, time.perf_counter() - started


async def bench_store(swarm: LocalSwarm, size: Size) -> dict[str, Any]:
    a, b = swarm.nodes
    figures: dict[str, Any] = {}
    async with (
        KuboClient(a.api_url, timeout=120) as ipfs_a,
        KuboClient(b.api_url, timeout=120) as ipfs_b,
    ):
        store_a = KVBlockStore(ipfs_a, pin_cap_bytes=1 << 40, pin_name="bench")
        store_b = KVBlockStore(ipfs_b, pin_cap_bytes=1 << 40, pin_name="bench")
        for mib in size.chunk_mib:
            times: dict[str, list[float]] = {
                k: [] for k in ("put_a", "get_a", "get_b", "memory", "loopback_tcp")
            }
            for repeat in range(size.store_repeats):
                data = random.Random(f"{mib}-{repeat}").randbytes(mib * MIB)
                chunk = KVChunk(
                    model="bench",
                    token_hashes=(ExternalBlockHash(mib * 1000 + repeat),),
                    dtype="uint8",
                    shape=(len(data),),
                    layout="bench/random-bytes",
                    data=data,
                )
                cid, seconds = await _timed(store_a.put(chunk))
                times["put_a"].append(seconds)
                for name, store in (("get_a", store_a), ("get_b", store_b)):
                    got, seconds = await _timed(store.get(cid))
                    if got.data != data:
                        raise BenchmarkError(f"{name}: the chunk came back changed")
                    times[name].append(seconds)
                times["memory"].append(memory_copy(data))
                times["loopback_tcp"].append(loopback_copy(data))
                await store_b.delete(cid)
                await store_a.delete(cid)
            figures[f"{mib}_mib"] = {
                f"{name}_mib_per_s": _mib_per_s(mib * MIB, seconds)
                for name, seconds in times.items()
            } | {"repeats": size.store_repeats}
            say(f"block store, {mib} MiB chunks: {json.dumps(figures[f'{mib}_mib'])}")
    return figures


# --- 2. restore against recompute ---------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    name: str
    url: str


@contextmanager
def ipfs_workers(
    processes: Processes, workdir: Path, model: Path, swarm: LocalSwarm
) -> Iterator[tuple[Worker, Worker]]:
    """Workers A and B, each on its own daemon of `swarm`, each trusting the other's key."""
    names = ("a", "b")
    keys = {n: load_or_create_key(workdir / f"{n}.pem")[0] for n in names}
    started = []
    for name, other, node in zip(names, reversed(names), swarm.nodes, strict=True):
        trusted = workdir / f"{name}-trusted.yaml"
        trusted.write_text(json.dumps({f"worker-{other}": public_pem(keys[other])}))
        port = free_port()
        processes.start(
            f"worker-{name}",
            *("worker", f"--model={model}", f"--port={port}", "--threads=2"),
            f"--ipfs-api={node.api_url}",
            f"--ipfs-key={workdir / f'{name}.pem'}",
            f"--ipfs-trusted={trusted}",
            f"--hash-seed={SEED}",
        )
        started.append(Worker(f"worker-{name}", f"http://127.0.0.1:{port}"))
    for worker in started:
        until(partial(processes.answer, worker.url), 120, f"{worker.name} answers")
        # The first generation pages the weights in: not something either side should pay for.
        generate(worker, "warm up")
    yield started[0], started[1]


def generate(worker: Worker, text: str, kv_from: str | None = None) -> Completed:
    """The worker's answer for one token of `text`."""
    request = CompletionRequest(
        model=BENCH.name, prompt=text, max_tokens=1, temperature=0, ignore_eos=True, kv_from=kv_from
    )
    try:
        return complete(worker.url, request)
    except WorkerError as e:
        raise BenchmarkError(f"{worker.name}: {e}") from e


def _first_token(worker: Worker, answer: Completed) -> float:
    """When the first token came, as the client saw it: the prompt's KV computed or loaded."""
    if answer.finished.first_token_seconds is None:
        raise BenchmarkError(f"{worker.name} generated no token")
    return answer.finished.first_token_seconds


def tokenize(worker: Worker, text: str) -> list[int]:
    response = httpx.post(f"{worker.url}/tokenize", json={"prompt": text}, timeout=60)
    response.raise_for_status()
    tokens: list[int] = response.json()["tokens"]
    return tokens


def prompt_of(worker: Worker, label: str, tokens: int) -> tuple[str, list[int]]:
    """A prompt of its own of at most `tokens` tokens (the bench model reads most vocabulary
    words as one token), as close as dropping whole words gets, and its tokens."""
    words = [label, *random.Random(label).choices(WORDS, k=tokens)]
    while True:
        text = " ".join(words)
        ids = tokenize(worker, text)
        if len(ids) <= tokens:
            return text, ids
        words = words[: len(words) - (len(ids) - tokens)]


def announced(worker: Worker, block: int, processes: Processes) -> bool:
    processes.check()
    return httpx.get(f"{worker.url}/v1/kv/ipfs/{block}", timeout=10).status_code == 200


@dataclass
class Round:
    prompt_tokens: int
    saved_after: float  # A's answer to its announcement
    restore: float
    restore_first_token: float
    transfer: Body
    recompute: float
    recompute_first_token: float
    same_text: bool


def one_round(a: Worker, b: Worker, processes: Processes, label: str, tokens: int) -> Round:
    text, ids = prompt_of(a, label, tokens)
    chain = prompt_block_keys(ids, seed=SEED)
    generate(a, text)
    answered = time.perf_counter()
    until(lambda: announced(a, chain[-1], processes), 120, f"{a.name} announces the KV of {label}")
    saved_after = time.perf_counter() - answered
    url = f"{a.url}/v1/kv/ipfs/{chain[-1]}"

    generate(b, f"hello world, not {label}")  # B's context holds something else
    restored = generate(b, text, kv_from=url)
    transfer = restored.finished.kv_transfer
    if not transfer or transfer.source != "ipfs":
        raise BenchmarkError(
            f"{b.name} did not load {label}'s KV from IPFS ({transfer}):\n" + processes.tail(b.name)
        )
    # B saves the prompt's KV to its own IPFS in the background; let it finish untimed.
    until(lambda: announced(b, chain[-1], processes), 120, f"{b.name} announces {label}")

    generate(b, f"hello again, not {label}")
    recomputed = generate(b, text)
    computed = recomputed.finished
    if computed.kv_transfer is not None or computed.usage.cached_tokens >= 16:
        raise BenchmarkError(f"{b.name} did not compute {label}: {computed.usage}")
    return Round(
        prompt_tokens=restored.finished.usage.prompt_tokens,
        saved_after=saved_after,
        restore=restored.seconds,
        restore_first_token=_first_token(b, restored),
        transfer=transfer.model_dump(exclude_none=True),
        recompute=recomputed.seconds,
        recompute_first_token=_first_token(b, recomputed),
        same_text=restored.text == recomputed.text,
    )


def bench_restore(
    processes: Processes, workdir: Path, size: Size, model: Path, swarm: LocalSwarm
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with ipfs_workers(processes, workdir, model, swarm) as (a, b):
        say("one untimed round, so the first size measured pays no first-time costs")
        one_round(a, b, processes, "warm", min(size.prefixes))
        for tokens in size.prefixes:
            rounds = []
            for repeat in range(size.repeats):
                rounds.append(one_round(a, b, processes, f"p{tokens}r{repeat}", tokens))
                say(f"{tokens} tokens, round {repeat}: {rounds[-1]}")
            restore = _median([r.restore for r in rounds])
            recompute = _median([r.recompute for r in rounds])
            figures[f"{tokens}_tokens"] = sized = {
                "prompt_tokens": rounds[0].prompt_tokens,
                "restored_tokens": rounds[0].transfer["tokens"],
                "state_mib": round(rounds[0].transfer["bytes"] / MIB, 2),
                "recompute_s": recompute,
                "recompute_first_token_s": _median([r.recompute_first_token for r in rounds]),
                "restore_s": restore,
                "restore_transfer_s": _median([r.transfer["seconds"] for r in rounds]),
                "restore_first_token_after_load_s": _median(
                    [r.restore_first_token for r in rounds]
                ),
                "restore_over_recompute": round(restore / recompute, 3),
                "saved_to_ipfs_after_s": _median([r.saved_after for r in rounds], 2),
                "same_text": all(r.same_text for r in rounds),
                "repeats": len(rounds),
                "runs_s": {
                    "restore": [round(r.restore, 4) for r in rounds],
                    "recompute": [round(r.recompute, 4) for r in rounds],
                },
            }
            say(f"{tokens} tokens: restore/recompute {sized['restore_over_recompute']}")
    at_target = figures.get(f"{TARGET_TOKENS}_tokens")
    figures["target"] = {
        "tokens": TARGET_TOKENS,
        "ratio_under": TARGET_RATIO,
        "met": None if at_target is None else at_target["restore_over_recompute"] < TARGET_RATIO,
    }
    return figures


def run(size: Size, workdir: Path) -> dict[str, Any]:
    processes = Processes(workdir)
    swarm = LocalSwarm(workdir / "ipfs", 2)
    result: dict[str, Any] = {
        "size": {k: list(v) if isinstance(v, tuple) else v for k, v in size.__dict__.items()}
    }
    try:
        model = write_model(workdir / f"{BENCH.name}.gguf", BENCH, progress=say)
        say("two Kubo daemons in a private swarm")
        swarm.up(timeout=120)
        say("block store put/get")
        result["block_store"] = asyncio.run(bench_store(swarm, size))
        say("restore from IPFS against recompute")
        result["restore_vs_recompute"] = bench_restore(processes, workdir, size, model, swarm)
    finally:
        processes.stop()  # the workers first: they hold their daemons' clients
        swarm.down()
    result["cpus"] = os.cpu_count()
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def _exit_on_sigterm(signum: int, _: object) -> None:
    # A `kill` of the benchmark runs the `finally`s that stop the workers and daemons.
    sys.exit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes: about a minute")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    size = SMOKE if args.smoke else FULL
    with tempfile.TemporaryDirectory(prefix="edgellm-kv-ipfs-bench-") as workdir:
        result = run(size, Path(workdir))
    target = result["restore_vs_recompute"]["target"]
    verdict = {True: "met", False: "NOT met", None: "not measured at this size"}[target["met"]]
    say(f"DESIGN's target, restore under {TARGET_RATIO}x of recompute at 4k tokens: {verdict}")
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
