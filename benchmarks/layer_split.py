"""Layer-split benchmark (issue #8): a model split across 1, 2 and 3 peers with llama.cpp's RPC
backend, on loopback and over links with added latency, against the same model on one peer.

Each configuration runs real processes: `edgellm stage` RPC servers, and an `edgellm worker`
that keeps the first layers and offloads the rest to them (`--rpc-servers`, `--layers`, as a
split's leader starts it). The generated bench model (8 layers) is split evenly. Links with
latency go through a TCP proxy in this process that holds every chunk for half the round trip
in each direction (this machine's kernel has no netem for traffic shaping). One request at a
time, each with a fresh prompt: TTFT (client clock, streamed) and decode tokens/s.

Progress goes to stderr; the figures are printed and written as JSON to --out.

    python -m benchmarks.layer_split --out bench-results/layer-split.json
    python -m benchmarks.layer_split --smoke --out bench-results/layer-split-smoke.json
"""

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import Processes, say, until
from edgellm.dev.cluster import free_port
from edgellm.worker import rpc
from edgellm.worker.models import BENCH, WORDS, write_model

LAYERS = BENCH.layers


class DelayProxy:
    """Forwards TCP connections to `target`, each direction held `delay` seconds, in order."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._connect, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_until_complete(server.serve_forever())

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    writer.close()
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(chunk)
                await writer.drain()

        delivering = asyncio.ensure_future(deliver())
        try:
            while chunk := await reader.read(1 << 16):
                queue.put_nowait((time.monotonic() + self.delay, chunk))
        except ConnectionError:
            pass
        queue.put_nowait((0.0, b""))
        await delivering


def _even_layers(peers: int) -> list[int]:
    base, extra = divmod(LAYERS, peers)
    return [base + (1 if i < extra else 0) for i in range(peers)]


@contextmanager
def _split_worker(
    processes: Processes, model: Path, peers: int, rtt_ms: float, threads: int
) -> Iterator[str]:
    """A leader over `peers - 1` stages, each behind a proxy adding `rtt_ms`; its URL."""
    endpoints = []
    for i in range(peers - 1):
        port = free_port()
        processes.start(
            f"stage-{peers}-{rtt_ms:g}-{i}",
            "stage",
            f"--port={port}",
            f"--health-port={free_port()}",
            f"--threads={threads}",
        )
        endpoint = f"127.0.0.1:{port}"
        until(partial(rpc.reachable, endpoint), 60, f"stage {i} listens")
        if rtt_ms:
            port = DelayProxy(("127.0.0.1", port), rtt_ms / 2000).port
        endpoints.append(f"127.0.0.1:{port}")
    port = free_port()
    options = [f"--model={model}", f"--port={port}", f"--threads={threads}", "--context=2048"]
    if endpoints:
        layers = ",".join(map(str, _even_layers(peers)))
        options += [f"--rpc-servers={','.join(endpoints)}", f"--layers={layers}"]
    name = f"leader-{peers}-{rtt_ms:g}"
    processes.start(name, "worker", *options)
    url = f"http://127.0.0.1:{port}"
    until(partial(processes.answer, url), 300, f"{name} answers")
    try:
        yield url
    finally:
        processes.stop()


def _generate(url: str, prompt: str, tokens: int) -> dict[str, float]:
    """TTFT and decode tokens/s of one streamed generation."""
    body = {
        "model": BENCH.name,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.monotonic()
    first = last = 0.0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                last = time.monotonic()
                first = first or last
    return {"ttft": first - started, "tokensPerSecond": (tokens - 1) / max(last - first, 1e-6)}


def run(model: Path, configurations: list[tuple[int, float]], args: argparse.Namespace) -> Any:
    rng = random.Random(0)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-split-") as workdir:
        processes = Processes(Path(workdir))
        for peers, rtt_ms in configurations:
            say(f"{peers} peer(s), {rtt_ms:g} ms added round trip")
            with _split_worker(processes, model, peers, rtt_ms, args.threads) as url:
                _generate(url, "warm up", 4)
                runs = []
                for _ in range(args.repeats):
                    prompt = " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
                    runs.append(_generate(url, prompt, args.tokens))
            figures = {
                "peers": peers,
                "addedRttMs": rtt_ms,
                "layers": _even_layers(peers),
                "ttftSeconds": round(statistics.median(r["ttft"] for r in runs), 3),
                "tokensPerSecond": round(statistics.median(r["tokensPerSecond"] for r in runs), 1),
            }
            say(json.dumps(figures))
            results.append(figures)
    baseline = results[0]
    for figures in results:
        figures["tokensPerSecondVsOnePeer"] = round(
            figures["tokensPerSecond"] / baseline["tokensPerSecond"], 3
        )
        figures["ttftVsOnePeer"] = round(figures["ttftSeconds"] / baseline["ttftSeconds"], 3)
    return {
        "model": {"name": BENCH.name, "layers": LAYERS, "bytes": model.stat().st_size},
        "promptWords": args.prompt_words,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "threadsPerProcess": args.threads,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="a size that takes about a minute")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each process")
    args = parser.parse_args()
    args.repeats, args.tokens, args.prompt_words = (1, 16, 60) if args.smoke else (3, 64, 300)
    latencies = [0.0] if args.smoke else [0.0, 10.0, 50.0]
    configurations = [(1, 0.0)] + [(p, ms) for p in (2, 3) for ms in latencies]
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-model-") as models:
        model = write_model(Path(models) / "bench-random.gguf", BENCH)
        report = run(model, configurations, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
