"""The router's Prometheus metrics, on their own registry so tests and processes don't mix.

Latency buckets reach down to a millisecond: the routing decision itself must stay under one.
"""

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgellm.scheduling import PLUGIN_BUCKETS, Decision
from edgellm.scheduling.layersplit import LayerPlan

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ROUTING_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


@dataclass
class RouterMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        registry = self.registry
        self.requests = Counter(
            "edgellm_router_requests",
            "Requests answered, by API endpoint, model and HTTP status code.",
            ["endpoint", "model", "code"],
            registry=registry,
        )
        self.ttft = Histogram(
            "edgellm_router_time_to_first_token_seconds",
            "From the request's arrival to its first generated token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "edgellm_router_inter_token_latency_seconds",
            "Mean time between a request's generated tokens after the first.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "edgellm_router_request_duration_seconds",
            "From the request's arrival to its last token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.routing_seconds = Histogram(
            "edgellm_router_routing_duration_seconds",
            "Time to choose a worker: prompt lookup and scheduling plugins.",
            buckets=_ROUTING_BUCKETS,
            registry=registry,
        )
        self.plugin_seconds = Histogram(
            "edgellm_router_scheduling_plugin_duration_seconds",
            "Time each scheduling plugin took over every candidate peer, by plugin.",
            ["plugin"],
            buckets=PLUGIN_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "edgellm_router_prompt_tokens",
            "Prompt tokens of answered requests.",
            ["model"],
            registry=registry,
        )
        self.cached_tokens = Counter(
            "edgellm_router_cached_prompt_tokens",
            "Prompt tokens whose KV the worker already held (the cache hit ratio's numerator).",
            ["model"],
            registry=registry,
        )
        self.generation_tokens = Counter(
            "edgellm_router_generation_tokens",
            "Tokens generated for answered requests.",
            ["model"],
            registry=registry,
        )
        self.decisions = Counter(
            "edgellm_router_routing_decisions",
            "Workers chosen, by routing policy and peer.",
            ["policy", "peer"],
            registry=registry,
        )
        self.disaggregation = Counter(
            "edgellm_router_disaggregation_decisions",
            "Prefill/decode split decisions: split or not.",
            ["split"],
            registry=registry,
        )
        for split in ("true", "false"):  # every series from the start, as dashboards expect
            self.disaggregation.labels(split)
        self.kv_transfer_seconds = Histogram(
            "edgellm_router_kv_transfer_duration_seconds",
            "Fetching and loading a prefilled prompt's KV on its decode worker.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.kv_loads = Counter(
            "edgellm_router_kv_loads",
            "Prompts whose KV the decode worker loaded rather than computed, by where from:"
            " a prefill peer, or IPFS.",
            ["source"],
            registry=registry,
        )
        for source in ("peer", "ipfs"):
            self.kv_loads.labels(source)
        self.worker_failures = Counter(
            "edgellm_router_worker_failures",
            "Attempts a worker broke off; the request went on elsewhere.",
            ["peer"],
            registry=registry,
        )
        self.index_blocks = Gauge(
            "edgellm_router_kv_index_blocks",
            "KV blocks the router's index knows, by medium.",
            ["medium"],
            registry=registry,
        )
        self.peers = Gauge(
            "edgellm_router_peers",
            "Peers the router can route to, by owning cluster.",
            ["cluster"],
            registry=registry,
        )

    def observe_plugins(self, placed: Decision | LayerPlan) -> None:
        """Each plugin's time for one placement (a split's plan, made without them, has none)."""
        if isinstance(placed, Decision):
            for plugin, seconds in placed.plugin_seconds.items():
                self.plugin_seconds.labels(plugin).observe(seconds)
