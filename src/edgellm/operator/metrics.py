"""The operator's Prometheus metrics, on their own registry so tests and processes don't mix."""

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge, Histogram


@dataclass
class OperatorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.peers = Gauge(
            "edgellm_operator_peers",
            "PeerNodes this cluster sees, by owning cluster and state.",
            ["cluster", "state"],
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
