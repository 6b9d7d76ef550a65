"""Router benchmark: the four routing policies side by side on one shared-prefix multi-turn chat
workload over real llama.cpp workers, the latency the router adds, and the KV index's size.

1. Policies: `--workers` real `edgellm worker`s serving the generated bench model (the medium
   one) with KV events, and for each policy in turn an `edgellm router --peers-file` over them;
   with `--vllm-router`, then the vLLM project's own router (pinned, installed by
   `tests/vllm_router.py`) with its `kv_aware` policy (by the workers' KV events) and its
   `cache_aware` one (by text), over the same workers.
   The workload: `--groups` long system prompts (a team's shared instructions), `--users` per
   group, each holding a `--turns`-turn conversation (the answer goes back into the next turn),
   all users at once. Every phase uses new system prompts, so no phase profits from the one
   before. Per policy: p50/p90 time to first token (streamed, client clock), throughput, and the
   cache hit rate (cached prompt tokens / prompt tokens, from the workers' usage) against an
   oracle's: an unbounded cache that holds every earlier prompt and answer, so each prompt's
   longest prefix seen before is cached.
2. Added latency: `--overhead-workers` tiny-model workers; at each rate in `--rates`, requests
   of one token arrive open-loop for `--seconds`, once straight to the workers (round-robin,
   `POST /v1/completions`) and once through the router (`POST /v1/completions`); the added latency
   is the difference of the percentiles.
3. Index: a `KVIndex` of 1,000 workers x 1,000 blocks (memory by tracemalloc), and the router's
   routing decision over 1,000 such peers for a 64-block prompt, in process.

Progress goes to stderr; the figures are printed and written as JSON to --out.

    python -m benchmarks.router --out bench-results/router.json
    python -m benchmarks.router --smoke --out bench-results/router-smoke.json
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import yaml
from openai.types.chat import ChatCompletionMessageParam
from tests import builders, vllm_router

from benchmarks.common import Processes, say, summary, until
from edgellm.api import InferenceRequestSpec
from edgellm.dev.cluster import free_port
from edgellm.kvcache import BlockStored, prompt_block_keys
from edgellm.kvcache.index import KVIndex, common_prefix
from edgellm.kvcache.subscriptions import KVSubscriptions
from edgellm.router.dispatch import Dispatcher, PromptKeys
from edgellm.router.metrics import RouterMetrics
from edgellm.router.peers import PeerDirectory
from edgellm.router.policies import POLICIES, Policy
from edgellm.router.tokenizers import GgufTokenizer
from edgellm.worker.models import BENCH, TINY, WORDS, write_model
from edgellm.workerapi import Job, WorkerClient
from edgellm.workerapi.protocol import TokenizeChatRequest

Body = dict[str, Any]


@dataclass(frozen=True)
class Size:
    workers: int
    groups: int
    users: int  # per group
    turns: int
    system_words: int  # of each group's system prompt
    max_tokens: int
    overhead_workers: int
    rates: tuple[float, ...]
    seconds: float
    index_workers: int
    index_blocks: int


STOCK_POLICIES = ("kv_aware", "cache_aware")
"""vllm-router's policies: by the workers' KV events, and by the text it routed where."""

FULL = Size(4, 4, 3, 4, 1200, 16, 4, (50.0, 100.0, 200.0), 5.0, 1000, 1000)
SMOKE = Size(4, 4, 2, 2, 300, 8, 2, (20.0, 50.0), 2.0, 100, 100)


@dataclass(frozen=True)
class Worker:
    name: str
    url: str
    kv_events: str


def peer_body(worker: Worker, model: str) -> Body:
    """A Ready PeerNode for the router's --peers-file, as `edgellm join` would write it."""
    events: Body = {"kvEvents": {"endpoint": worker.kv_events}} if worker.kv_events else {}
    return builders.peer_body(
        worker.name,
        cluster="bench",
        endpoint=worker.url,
        resources={"cpu": "2", "memory": "4Gi"},
        models=[{"name": model, "format": "gguf"}],
        **events,
    )


@contextmanager
def workers(processes: Processes, model: Path, count: int, prefix: str) -> Iterator[list[Worker]]:
    started = []
    for index in range(count):
        port, events = free_port(), free_port()
        name = f"{prefix}-{index}"
        processes.start(
            name,
            *("worker", f"--model={model}", f"--port={port}", "--threads=1"),
            f"--kv-events=tcp://*:{events}",
        )
        started.append(Worker(name, f"http://127.0.0.1:{port}", f"tcp://127.0.0.1:{events}"))
    for worker in started:
        until(partial(processes.answer, worker.url), 120, f"{worker.name} answers")
        # The first generation pages the weights in: not something any policy should pay for.
        warm = {"model": model.stem, "prompt": "warm up", "max_tokens": 4}
        httpx.post(f"{worker.url}/v1/completions", json=warm, timeout=120).raise_for_status()
    yield started


@contextmanager
def stock_router(
    processes: Processes,
    binary: Path,
    workers: list[Worker],
    policy: str,
    lookups: dict[str, float],
) -> Iterator[str]:
    """vllm-router with `policy` over the workers (`kv_aware`: following their KV events); when
    the phase is over, `lookups` gets its KV placement lookups by result."""
    port, metrics_port = free_port(), free_port()
    name = f"vllm-router-{policy}-{port}"
    argv = vllm_router.command(
        binary,
        port=port,
        metrics_port=metrics_port,
        workers=[(w.url, w.kv_events) for w in workers],
        model=BENCH.name,
        policy=policy,
    )
    process = processes.run(name, argv)
    url = f"http://127.0.0.1:{port}"
    until(partial(processes.serves, url, "/health"), 60, f"vllm-router {policy} is up")
    try:
        yield url
        lookups.update(vllm_router.placements(f"http://127.0.0.1:{metrics_port}"))
    finally:
        process.terminate()
        process.wait(timeout=20)
        processes.running.remove((name, process))


@contextmanager
def router(
    processes: Processes, workdir: Path, peers: list[Body], policy: str, *options: str
) -> Iterator[str]:
    peers_file = workdir / f"peers-{policy}.yaml"
    peers_file.write_text(yaml.safe_dump_all(peers))
    port = free_port()
    name = f"router-{policy}-{port}"
    process = processes.start(
        name,
        *("router", f"--peers-file={peers_file}", "--anonymous", f"--policy={policy}"),
        *(f"--port={port}", "--rate-limit=1000000/minute", *options),
    )
    url = f"http://127.0.0.1:{port}"
    until(partial(processes.answer, url), 60, f"the {policy} router is up")
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        processes.running.remove((name, process))


# --- 1. policies --------------------------------------------------------------------------


def system_prompt(rng: random.Random, words: int, label: str) -> str:
    return f"[{label}] " + " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Turn:
    sent_at: float
    ttft: float
    seconds: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    messages: list[Body]
    answer: str


async def conversation(
    client: openai.AsyncOpenAI, system: str, user: int, size: Size, rng: random.Random
) -> list[Turn]:
    messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": system}]
    turns = []
    for turn in range(size.turns):
        question = f"user {user} turn {turn}: " + " ".join(rng.choice(WORDS) for _ in range(12))
        messages.append({"role": "user", "content": question})
        started = time.perf_counter()
        first, text, usage = None, [], None
        stream = await client.chat.completions.create(
            model=BENCH.name,
            messages=messages,
            max_tokens=size.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        assert usage is not None
        assert first is not None
        details = usage.prompt_tokens_details
        answer = "".join(text)
        turns.append(
            Turn(
                started,
                first - started,
                time.perf_counter() - started,
                usage.prompt_tokens,
                (details.cached_tokens or 0) if details else 0,
                usage.completion_tokens,
                [dict(m) for m in messages],
                answer,
            )
        )
        messages.append({"role": "assistant", "content": answer})
    return turns


def oracle_hit_rate(turns: list[Turn], tokenizer: GgufTokenizer) -> float:
    """Every earlier prompt with its answer cached forever; each prompt's longest prefix hits."""
    seen: list[list[int]] = []
    cached = total = 0
    for turn in sorted(turns, key=lambda t: t.sent_at):
        chat = TokenizeChatRequest.model_validate({"messages": turn.messages})
        tokens = tokenizer.tokens(chat)
        best = max((common_prefix(tokens, s) for s in seen), default=0)
        cached += min(best, len(tokens) - 1)  # the last prompt token is always computed
        total += len(tokens)
        seen.append(tokenizer.tokenize(tokenizer.text(chat) + turn.answer))
    return cached / total if total else 0.0


async def run_workload(url: str, size: Size, label: str, seed: int) -> tuple[list[Turn], float]:
    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    systems = [
        system_prompt(rng, size.system_words, f"{label} group {g}") for g in range(size.groups)
    ]
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            conversation(client, systems[g], u, size, random.Random(rng.random()))
            for g in range(size.groups)
            for u in range(size.users)
        )
    )
    wall = time.perf_counter() - started
    await client.close()
    return [turn for turns in results for turn in turns], wall


def bench_policies(
    processes: Processes,
    workdir: Path,
    size: Size,
    model: Path,
    policies: list[Policy],
    stock: Path | None,
) -> dict[str, Any]:
    """Each policy's figures; `stock`: vllm-router's command, whose policies follow ours."""
    tokenizer = GgufTokenizer(model)
    figures: dict[str, Any] = {}
    with workers(processes, model, size.workers, "bench") as started:
        peers = [peer_body(w, BENCH.name) for w in started]
        # Whichever phase came first ran slower (allocations of long prompts' first prefills):
        # one untimed pass through every worker, so the first policy measured pays nothing.
        with router(processes, workdir, peers, "round-robin") as url:
            say("warming the workers up with the workload, untimed")
            asyncio.run(run_workload(url, size, "warm-up", seed=-1))
        tokenized = f"--tokenizer={BENCH.name}={model}"
        phases: list[tuple[str, Callable[[], AbstractContextManager[str]]]] = [
            (policy, partial(router, processes, workdir, peers, policy, tokenized))
            for policy in policies
        ]
        lookups: dict[str, dict[str, float]] = {}
        if stock is not None:
            phases += [
                (
                    f"vllm-router {p}",
                    partial(stock_router, processes, stock, started, p, lookups.setdefault(p, {})),
                )
                for p in STOCK_POLICIES
            ]
        for number, (policy, serving) in enumerate(phases):
            with serving() as url:
                say(f"policy {policy}: {size.groups * size.users} conversations")
                turns, wall = asyncio.run(run_workload(url, size, policy, seed=number))
            prompt = sum(t.prompt_tokens for t in turns)
            cached = sum(t.cached_tokens for t in turns)
            oracle = oracle_hit_rate(turns, tokenizer)
            ttfts = sorted(t.ttft * 1000 for t in turns)
            figures[policy] = {
                "requests": len(turns),
                "ttft_ms": {
                    "p50": round(statistics.median(ttfts), 1),
                    "p90": round(ttfts[int(0.9 * (len(ttfts) - 1))], 1),
                },
                "requests_per_second": round(len(turns) / wall, 3),
                "generated_tokens_per_second": round(
                    sum(t.completion_tokens for t in turns) / wall, 1
                ),
                "cache_hit_rate": round(cached / prompt, 3),
                "oracle_hit_rate": round(oracle, 3),
                "hit_rate_of_oracle": round(cached / prompt / oracle, 3) if oracle else None,
                "mean_prompt_tokens": round(prompt / len(turns)),
            }
            if placed := lookups.get(policy.removeprefix("vllm-router ")):
                figures[policy]["kv_placement_lookups"] = placed
            say(f"policy {policy}: {json.dumps(figures[policy])}")
    if not {"round-robin", "kv-aware"} <= figures.keys():
        return figures
    base = figures["round-robin"]
    ours = figures["kv-aware"]
    figures["kv_aware_vs_round_robin"] = {
        "p90_ttft_better_x": round(base["ttft_ms"]["p90"] / ours["ttft_ms"]["p90"], 2),
        "throughput_x": round(ours["requests_per_second"] / base["requests_per_second"], 2),
    }
    return figures


# --- 2. added latency ---------------------------------------------------------------------


async def _open_loop(send: Any, rate: float, seconds: float) -> tuple[list[float], int]:
    """Requests arrive every 1/rate s whatever the answers do: the latencies of those
    answered (ms), and how many failed."""
    latencies: list[float] = []
    failures: list[int] = []

    async def one(index: int) -> None:
        started = time.perf_counter()
        try:
            await send(index)
        except httpx.HTTPError:
            failures.append(index)
            return
        latencies.append((time.perf_counter() - started) * 1000)

    tasks = []
    start = time.perf_counter()
    for index in range(int(rate * seconds)):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)
    return latencies, len(failures)


async def _measure(urls: list[str], router_url: str, rate: float, seconds: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def direct(index: int) -> None:
            body = {"model": TINY.name, "prompt": f"{index} the model", "max_tokens": 1}
            response = await http.post(f"{urls[index % len(urls)]}/v1/completions", json=body)
            response.raise_for_status()

        async def routed(index: int) -> None:
            body = {"model": TINY.name, "prompt": f"{index} the model", "max_tokens": 1}
            response = await http.post(f"{router_url}/v1/completions", json=body)
            response.raise_for_status()

        straight, straight_failed = await _open_loop(direct, rate, seconds)
        through, through_failed = await _open_loop(routed, rate, seconds)
    a, b = summary(straight), summary(through)
    return {
        "direct_ms": a,
        "router_ms": b,
        "direct_failed": straight_failed,
        "router_failed": through_failed,
        "added_ms": {q: round(float(b[q]) - float(a[q]), 2) for q in ("p50", "p99")},
    }


def bench_overhead(processes: Processes, workdir: Path, size: Size, model: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with workers(processes, model, size.overhead_workers, "tiny") as started:
        peers = [peer_body(w, TINY.name) for w in started]
        with router(
            processes, workdir, peers, "kv-aware", f"--tokenizer={TINY.name}={model}"
        ) as url:
            for rate in size.rates:
                say(f"added latency at {rate:g} requests/s")
                figures[f"{rate:g}_per_second"] = asyncio.run(
                    _measure([w.url for w in started], url, rate, size.seconds)
                )
                say(json.dumps(figures[f"{rate:g}_per_second"]["added_ms"]))
    return figures


# --- 3. index -----------------------------------------------------------------------------


def bench_index(size: Size) -> dict[str, Any]:
    rng = random.Random(0)
    prompt = [rng.randrange(200) for _ in range(64 * 16)]
    keys = prompt_block_keys(prompt, seed="0")
    tracemalloc.start()
    index = KVIndex()
    for worker in range(size.index_workers):
        hashes = [rng.getrandbits(64) for _ in range(size.index_blocks)]
        if worker % 10 == 0:  # a tenth hold some of the prompt
            hashes[: worker % 64] = keys[: worker % 64]
        stored = BlockStored(hashes, None, [], 16, None, None, None)
        index.apply(f"peer-{worker}", [stored])
    memory, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    async def route_times() -> list[float]:
        peers = PeerDirectory(None, KVSubscriptions(index))
        addresses = (f"http://10.0.{w // 250}.{w % 250}.1:8600" for w in range(size.index_workers))
        peers.set_peers(
            [peer_body(Worker(f"peer-{w}", url, ""), TINY.name) for w, url in enumerate(addresses)]
        )
        client = WorkerClient()
        dispatcher = Dispatcher(peers=peers, index=index, client=client, metrics=RouterMetrics())
        spec = InferenceRequestSpec(model=TINY.name, prompt="x")
        times = []
        for _ in range(200):
            started = time.perf_counter()
            dispatcher.route(Job("bench", spec), PromptKeys(blocks=keys), frozenset())
            times.append((time.perf_counter() - started) * 1000)
        await client.aclose()
        await peers.kv.stop()
        return times

    times = asyncio.run(route_times())
    return {
        "workers": size.index_workers,
        "blocks_per_worker": size.index_blocks,
        "index_mib": round(memory / 2**20, 1),
        "route_over_all_peers_ms": summary(times, 3),
    }


def run(size: Size, workdir: Path, policies: list[Policy], stock: Path | None) -> dict[str, Any]:
    processes = Processes(workdir)
    models = Path(tempfile.mkdtemp(prefix="models-", dir=workdir))
    try:
        bench = write_model(models / f"{BENCH.name}.gguf", BENCH, progress=say)
        tiny = write_model(models / f"{TINY.name}.gguf", TINY)
        result: dict[str, Any] = {"size": size.__dict__ | {"rates": list(size.rates)}}
        result["policies"] = bench_policies(processes, workdir, size, bench, policies, stock)
        result["added_latency"] = bench_overhead(processes, workdir, size, tiny)
        say("index")
        result["index"] = bench_index(size)
    finally:
        processes.stop()
    result["cpus"] = os.cpu_count()
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes: a few minutes")
    parser.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"which, in this order (default {','.join(POLICIES)})",
    )
    parser.add_argument(
        "--vllm-router",
        action="store_true",
        help=f"also measure vllm-router {vllm_router.VERSION}'s {' and '.join(STOCK_POLICIES)}"
        " (installed from PyPI into its own venv the first time)",
    )
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    policies = [cast(Policy, p) for p in args.policies.split(",")]
    if unknown := set(policies) - set(POLICIES):
        parser.error(f"unknown policies {sorted(unknown)}; known: {', '.join(POLICIES)}")
    size = SMOKE if args.smoke else FULL
    with tempfile.TemporaryDirectory(prefix="edgellm-router-bench-") as workdir:
        stock = vllm_router.install() if args.vllm_router else None
        result = run(size, Path(workdir), policies, stock)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
