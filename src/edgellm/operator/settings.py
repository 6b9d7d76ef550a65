"""The operator's settings, from `edgellm operator` options; defaults suit a home-lab cluster."""

from pathlib import Path

from pydantic import BaseModel, Field

from edgellm.operator.workerpools import DEFAULT_IMAGE as DEFAULT_WORKER_IMAGE
from edgellm.scheduling import ProfileConfig


class OperatorSettings(BaseModel):
    cluster: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """This cluster's name in the federation (as `edgellm federation init` recorded it)."""
    kubeconfig: Path | None = None
    """Kubeconfig of this cluster; None inside a pod (in-cluster credentials)."""
    health_interval_seconds: float = Field(default=2.0, gt=0)
    """How often peers' heartbeats are checked."""
    peer_removal_grace_seconds: float = Field(default=300.0, ge=0)
    """How long a peer stays, not Ready, after its heartbeat expired, before it is deleted."""
    sync_interval_seconds: float = Field(default=5.0, gt=0)
    """How often each member is probed and its mirrors reconciled, changes or not."""
    member_timeout_seconds: float = Field(default=5.0, gt=0)
    """How long a call to another member may take before it counts as unreachable."""
    node_interval_seconds: float = Field(default=10.0, gt=0)
    """How often labelled Nodes are turned into PeerNodes and their heartbeats copied."""
    progress_interval_seconds: float = Field(default=1.0, gt=0)
    """How often a running request's output so far is written to its status (what a request
    resumed after a lost peer or an operator restart goes on from)."""
    inline_output_limit_bytes: int = Field(default=16384, ge=0)
    """Outputs larger than this go to a ConfigMap the request owns, named in its status."""
    kv_hash_seed: str = "0"
    """Seed of the KV block hashes: the workers' --hash-seed (vLLM's PYTHONHASHSEED)."""
    scheduler_profile: ProfileConfig | None = None
    """The scheduling plugins and weights; None for the default profile."""
    pool_interval_seconds: float = Field(default=5.0, gt=0)
    """How often every WorkerPool is sized to its demand, its workers' state read, and its
    worker pods registered and heartbeated as peers."""
    worker_image: str = Field(default=DEFAULT_WORKER_IMAGE, min_length=1)
    """The image of pools' workers that name none in their spec."""
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    """Port of the Prometheus /metrics endpoint; 0 turns it off."""
    peering: str | None = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    )
    """The ClusterKopfPeering this operator joins: of its replicas, the one started first works
    and the others stand by. None: standalone, the only operator of its cluster."""
    peering_lifetime_seconds: int = Field(default=15, ge=5)
    """How long this operator's keep-alive in the peering stays valid: the others take over
    this long after it stopped without saying so (killed, its node lost); at once otherwise."""
    leadership_interval_seconds: float = Field(default=1.0, gt=0)
    """How often the peering is read to start or stop the operator's own loops."""
