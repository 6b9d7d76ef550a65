"""What every benchmark shares: progress lines, waiting on a condition, percentiles, the
processes a benchmark starts (stopped however it ends), and one generation asked of a worker."""

import asyncio
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from edgellm.workerapi import Finished, Text, WorkerClient
from edgellm.workerapi.protocol import CompletionRequest

T = TypeVar("T")


class BenchmarkError(Exception):
    """Something the benchmark waited for did not happen."""


_STARTED = time.monotonic()


def say(line: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {line}", file=sys.stderr, flush=True)


def until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Polls `check` until it returns something truthy, or raises saying what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchmarkError(f"within {timeout:.0f}s: {what}")
        time.sleep(interval)


def summary(values: list[float], digits: int = 2) -> dict[str, float | int]:
    """Count, p50, p99 (nearest rank), max and mean of `values`."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "n": len(ordered),
        "p50": round(rank(0.5), digits),
        "p99": round(rank(0.99), digits),
        "max": round(ordered[-1], digits),
        "mean": round(statistics.fmean(ordered), digits),
    }


@dataclass
class Processes:
    """Every process the benchmark starts, stopped in reverse order however it ends."""

    workdir: Path
    running: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """`edgellm` with `args`."""
        return self.run(name, [sys.executable, "-m", "edgellm", *args])

    def run(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Any program, its output in the workdir's `<name>.log`."""
        with (self.workdir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.running.append((name, process))
        return process

    def serves(self, url: str, health: str = "/healthz") -> bool:
        """Whether the server at `url` answers its `health` path; raises if a process has
        exited."""
        self.check()
        try:
            return httpx.get(f"{url}{health}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def check(self) -> None:
        for name, process in self.running:
            if process.poll() is not None:
                raise BenchmarkError(f"{name} exited with {process.returncode}: {self.tail(name)}")

    def answer(self, url: str) -> bool:
        """Whether the EdgeLLM server at `url` answers its /healthz."""
        return self.serves(url)

    def tail(self, name: str, lines: int = 15) -> str:
        text = (self.workdir / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        for _, process in reversed(self.running):
            if process.poll() is None:
                process.terminate()
        for _, process in reversed(self.running):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.running.clear()


@dataclass(frozen=True)
class Completed:
    """A worker's whole answer, streamed: its text and how it finished (usage, the KV it
    loaded, and its first token's time as the client saw it), and the wall time it took."""

    text: str
    finished: Finished
    seconds: float


def complete(url: str, request: CompletionRequest) -> Completed:
    """One generation asked of the worker at `url`, streamed through the `WorkerClient`."""

    async def stream() -> Completed:
        client = WorkerClient()
        texts, finished = [], None
        started = time.perf_counter()
        try:
            async for event in client.stream(url, request):
                if isinstance(event, Text):
                    texts.append(event.text)
                else:
                    finished = event
        finally:
            await client.aclose()
        assert finished is not None  # the client raises on a stream that did not finish
        return Completed("".join(texts), finished, time.perf_counter() - started)

    return asyncio.run(stream())
