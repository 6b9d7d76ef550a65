"""vllm-router, the vLLM project's Rust router: a stock consumer of vLLM's KV events, pinned and
installed from PyPI into a virtual environment of its own under ~/.cache/edgellm (its
dependencies are not EdgeLLM's). `tests/e2e/test_vllm_router.py` routes EdgeLLM workers with its
`kv_aware` policy, and `python -m benchmarks.router --vllm-router` measures it beside EdgeLLM's.

What its `kv_aware` policy needs of a worker, read from vllm-router 0.1.17's sources (the
sdist's `src/kv_index/subscriber.rs`, `admit.rs`, `policies/kv_aware.rs`): `GET /health`
before it routes there; the prompt's tokens from vLLM's `POST /v1/completions/render`, else
`POST /tokenize`; and KV events whose ZMQ topic is exactly its source's, which for the static
sources of `--kv-event-source` is vLLM's default empty topic.
"""

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import httpx
from prometheus_client.parser import text_string_to_metric_families

VERSION: Final = "0.1.17"


class VllmRouterUnavailableError(RuntimeError):
    """vllm-router could not be installed from PyPI."""


def install() -> Path:
    """The `vllm-router` command of the pinned version, installed once into its own venv."""
    cache = Path(os.environ.get("EDGELLM_CACHE", Path.home() / ".cache" / "edgellm"))
    venv = cache / f"vllm-router-{VERSION}"
    binary = venv / "bin" / "vllm-router"
    if binary.exists():
        return binary
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--quiet", f"vllm-router=={VERSION}"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise VllmRouterUnavailableError(
                f"installing vllm-router {VERSION} from PyPI into {venv} failed"
                f" ({' '.join(step[:3])} ...): {(done.stderr or done.stdout)[-2000:]}"
                f"\nThis check needs PyPI once; remove {venv} and run it again."
            )
    return binary


def command(
    binary: Path,
    *,
    port: int,
    metrics_port: int,
    workers: Sequence[tuple[str, str]],
    model: str,
    policy: str,
) -> list[str]:
    """vllm-router over `workers` (URL, KV-event endpoint), on loopback, with `policy`; only
    `kv_aware` follows the KV events (vllm-router refuses event sources for the others)."""
    sources = [f"--kv-event-source={url}={events}" for url, events in workers]
    if policy != "kv_aware":
        sources = []
    return [
        str(binary),
        *("--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(metrics_port)),
        *("--worker-urls", *(url for url, _ in workers)),
        *("--policy", policy, *sources),
        *(("--kv-event-model", model) if sources else ()),
        *("--log-level", "debug"),
    ]


def placements(metrics_url: str) -> dict[str, float]:
    """vllm-router's `kv_aware` placement lookups so far by result ("hit", "miss",
    "missing_tokens": no prompt tokens from the worker, ...), from its Prometheus endpoint."""
    text = httpx.get(f"{metrics_url}/metrics", timeout=10).raise_for_status().text
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "vllm_router_kv_placement_lookups"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
