"""The operator's Prometheus metrics, on their own registry so tests and processes don't mix.

Names follow Prometheus' conventions: base units in the name (seconds, bytes), `_total` only on
counters (added by the client), a label only where it splits the series usefully.
"""

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgellm.scheduling import PLUGIN_BUCKETS, Decision
from edgellm.scheduling.layersplit import LayerPlan

_SCHEDULING_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5)


@dataclass
class OperatorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.leading = Gauge(
            "edgellm_operator_leading",
            "1 while this operator works (always when standalone), 0 while it stands by for"
            " another replica of its peering.",
            registry=self.registry,
        )
        self.peers = Gauge(
            "edgellm_operator_peers",
            "PeerNodes this cluster sees, by owning cluster and state.",
            ["cluster", "state"],
            registry=self.registry,
        )
        self.heartbeat = Gauge(
            "edgellm_operator_peer_last_heartbeat_timestamp_seconds",
            "When each peer this cluster sees last reported in (Unix time).",
            ["cluster", "peer"],
            registry=self.registry,
        )
        self.kv_cache_usage = Gauge(
            "edgellm_operator_peer_kv_cache_usage_ratio",
            "Share of each peer's KV cache in use at its last heartbeat.",
            ["cluster", "peer"],
            registry=self.registry,
        )
        self.accelerators = Gauge(
            "edgellm_operator_peer_accelerators",
            "Accelerator devices of the Ready peers, by owning cluster: the federation's capacity.",
            ["cluster"],
            registry=self.registry,
        )
        self.members = Gauge(
            "edgellm_operator_federation_members",
            "Federation members of this cluster, by reachability.",
            ["state"],
            registry=self.registry,
        )
        self.sync_lag = Gauge(
            "edgellm_operator_federation_sync_lag_seconds",
            "Seconds since this cluster's peers were last mirrored into a member.",
            ["member"],
            registry=self.registry,
        )
        self.sync_duration = Histogram(
            "edgellm_operator_mirror_sync_duration_seconds",
            "Time to reconcile this cluster's mirrors in one member.",
            ["member"],
            registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            "edgellm_operator_reconcile_duration_seconds",
            "Time of one reconciliation, by controller: a peer-health pass over every peer, or"
            " one labelled Node.",
            ["controller"],
            registry=self.registry,
        )
        self.request_phases = Counter(
            "edgellm_operator_inference_requests",
            "InferenceRequests that entered each phase; Scheduled counts every attempt.",
            ["phase"],
            registry=self.registry,
        )
        self.scheduling_duration = Histogram(
            "edgellm_operator_scheduling_duration_seconds",
            "Time to choose an InferenceRequest's peer (and a prefill peer to split with).",
            buckets=_SCHEDULING_BUCKETS,
            registry=self.registry,
        )
        self.scheduling_plugin_duration = Histogram(
            "edgellm_operator_scheduling_plugin_duration_seconds",
            "Time each scheduling plugin took over every candidate peer, by plugin.",
            ["plugin"],
            buckets=PLUGIN_BUCKETS,
            registry=self.registry,
        )

    def observe_plugins(self, placed: Decision | LayerPlan) -> None:
        """Each plugin's time for one placement (a split's plan, made without them, has none)."""
        if isinstance(placed, Decision):
            for plugin, seconds in placed.plugin_seconds.items():
                self.scheduling_plugin_duration.labels(plugin).observe(seconds)
