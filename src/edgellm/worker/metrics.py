"""What a worker reports: its Prometheus metrics on their own registry, and the load its peer's
heartbeat carries (`edgellm join` reads it from `/healthz`), which the gauges read too.

The server (`server.py`) counts generations; the llama.cpp backend (`llamaworker.py`) counts KV
transfers, IPFS traffic and KV blocks. Every series exists whatever the backend, so dashboards
find them all (`tests/unit/test_dashboards.py`).
"""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgellm.api import PeerLoad

_IPFS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def smooth(average: float, sample: float) -> float:
    """An exponential moving average, so one odd request does not swing the peer's figures."""
    return sample if average == 0 else 0.7 * average + 0.3 * sample


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.load = PeerLoad()
        self.generated_tokens = Counter(
            "edgellm_worker_generated_tokens", "Tokens generated.", registry=registry
        )
        self.requests = Counter(
            "edgellm_worker_requests",
            "Generations finished, by why they stopped.",
            ["finish_reason"],
            registry=registry,
        )
        self.ttft = Histogram(
            "edgellm_worker_time_to_first_token_seconds",
            "From request to first token.",
            registry=registry,
        )
        self.kv_transfers = Counter(
            "edgellm_worker_kv_transfers",
            "KV states fetched for kvFrom, by whether they were loaded or the prompt computed"
            " instead, and whence: a prefill peer over HTTP, or IPFS.",
            ["outcome", "source"],
            registry=registry,
        )
        for outcome in ("loaded", "failed"):
            for source in ("peer", "ipfs"):
                self.kv_transfers.labels(outcome, source)
        self.kv_transfer_bytes = Counter(
            "edgellm_worker_kv_transfer_bytes",
            "Bytes of KV state fetched from prefill peers.",
            registry=registry,
        )
        self.ipfs_bytes = Counter(
            "edgellm_worker_ipfs_bytes",
            "Bytes of KV state stored in (put) or fetched through (get) this peer's IPFS daemon.",
            ["direction"],
            registry=registry,
        )
        for direction in ("put", "get"):
            self.ipfs_bytes.labels(direction)
        self.ipfs_fetch_seconds = Histogram(
            "edgellm_worker_ipfs_fetch_duration_seconds",
            "From kvFrom to a KV state fetched through IPFS and checked, announcement included.",
            buckets=_IPFS_BUCKETS,
            registry=registry,
        )
        self.ipfs_save_seconds = Histogram(
            "edgellm_worker_ipfs_save_duration_seconds",
            "From a prompt's KV state exported to it stored in IPFS and announced.",
            buckets=_IPFS_BUCKETS,
            registry=registry,
        )
        self._busy: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self._gauge(
            "edgellm_worker_running_requests",
            "Generations holding the model now.",
            lambda: self.report().running_requests,
        )
        self._gauge(
            "edgellm_worker_queued_requests",
            "Generations waiting for the model.",
            lambda: self.report().queued_requests,
        )
        self._gauge(
            "edgellm_worker_decode_tokens_per_second",
            "Smoothed decode speed of recent generations.",
            lambda: self.load.tokens_per_second,
        )
        self._gauge(
            "edgellm_worker_prefill_tokens_per_second",
            "Smoothed prefill speed of recent prompts (cached or loaded ones left out).",
            lambda: self.load.prefill_tokens_per_second,
        )
        self._gauge(
            "edgellm_worker_kv_cache_usage_ratio",
            "Share of the context's KV cache held after the last generation.",
            lambda: self.load.kv_cache_usage,
        )
        self._kv_blocks: Callable[[], float] = lambda: 0
        self._gauge(
            "edgellm_worker_kv_blocks",
            "KV blocks the context holds, as KV events announce them (0 without KV events).",
            lambda: self._kv_blocks(),
        )

    def count_requests(self, busy: Callable[[], tuple[int, int]]) -> None:
        """Where the running and queued generations are counted from (the server's)."""
        self._busy = busy

    def report(self) -> PeerLoad:
        """The load now: what the gauges and the peer's heartbeat report."""
        self.load.running_requests, self.load.queued_requests = self._busy()
        return self.load

    def count_kv_blocks(self, blocks: Callable[[], float]) -> None:
        """Where `edgellm_worker_kv_blocks` reads from: the KV events' tracker."""
        self._kv_blocks = blocks

    def learn_prefill_rate(self, computed: int, seconds: float) -> None:
        if computed > 0 and seconds > 0:  # a cached or loaded prompt says nothing of the speed
            rate = computed / seconds
            speed = smooth(self.load.prefill_tokens_per_second, rate)
            self.load.prefill_tokens_per_second = round(speed, 1)

    def learn_decode_rate(self, tokens: int, seconds: float) -> None:
        if tokens > 1 and seconds > 0:
            speed = smooth(self.load.tokens_per_second, tokens / seconds)
            self.load.tokens_per_second = round(speed, 1)

    def _gauge(self, name: str, documentation: str, value: Callable[[], float]) -> None:
        # Read at scrape time, so the gauges and the heartbeat report the same numbers.
        Gauge(name, documentation, registry=self.registry).set_function(value)
