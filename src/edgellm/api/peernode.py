"""`PeerNode`: one machine of the federation that can run prefill or decode workers.

Cluster-scoped. `edgellm join` (or the operator, for labelled Kubernetes Nodes) writes the spec;
the operator writes the status. The scheduler reads both.
"""

from datetime import datetime
from typing import Literal, Self

from pydantic import ConfigDict, Field, model_validator

from edgellm.api._common import (
    API_VERSION,
    DNS_LABEL_PATTERN,
    ClusterName,
    Condition,
    Model,
    ModelName,
    ObjectMeta,
    Quantity,
    TrustLevel,
    cel,
    conditions_field,
)

Role = Literal["prefill", "decode"]
Backend = Literal["llamacpp", "vllm"]
AcceleratorVendor = Literal["nvidia", "amd", "intel", "apple"]
ModelFormat = Literal["gguf", "safetensors"]

# On a mirrored PeerNode: the member cluster it was mirrored from (= its spec.cluster).
ORIGIN_CLUSTER_LABEL = "edgellm.io/origin-cluster"
# On a Kubernetes Node: the operator keeps a PeerNode standing for it.
NODE_PEER_LABEL = "edgellm.io/peer"

# IPFS peer ids: base58 multihashes (Qm..., 12D3Koo...) or base36 CIDs (k51...).
IPFS_PEER_ID_PATTERN = (
    r"^(Qm[1-9A-HJ-NP-Za-km-z]{44}|12D3KooW[1-9A-HJ-NP-Za-km-z]{44}|k51[0-9a-z]{59})$"
)

# vLLM runs on CUDA and ROCm devices only.
VLLM_VENDORS: tuple[AcceleratorVendor, ...] = ("nvidia", "amd")


class Accelerator(Model):
    """A kind of GPU or other accelerator the peer has."""

    vendor: AcceleratorVendor
    """Who makes it: nvidia, amd, intel or apple."""
    model: str = Field(min_length=1, max_length=128)
    """The product name, e.g. NVIDIA-GeForce-RTX-4090."""
    memory: Quantity
    """Memory of one device, e.g. 24Gi."""
    count: int = Field(default=1, ge=1, le=64)
    """How many devices of this kind."""


class PeerResources(Model):
    """What the peer can give to workers."""

    cpu: Quantity
    """CPU cores, e.g. 8 or 7500m."""
    memory: Quantity
    """Memory for workers, e.g. 32Gi."""
    accelerators: list[Accelerator] = Field(default_factory=list, max_length=16)
    """GPUs and other accelerators; empty for a CPU-only peer."""


class PeerNetwork(Model):
    """The peer's link to the rest of the federation, which decides whether moving KV pays."""

    uplink_mbps: float = Field(default=100.0, gt=0, le=1_000_000)
    """Upload bandwidth in Mbit/s."""
    downlink_mbps: float = Field(default=100.0, gt=0, le=1_000_000)
    """Download bandwidth in Mbit/s."""
    region: str = Field(default="", max_length=63)
    """A free-form locality label; peers in one region are preferred for each other."""


class LocalModel(Model):
    """A model whose weights the peer already holds."""

    name: ModelName = Field(min_length=1, max_length=253)
    """The model name requests use, e.g. qwen2.5-0.5b-instruct."""
    format: ModelFormat = "gguf"
    """gguf for llama.cpp, safetensors for vLLM."""
    size_bytes: int | None = Field(default=None, ge=0)
    """Size of the weights on disk, when known."""
    kv_bytes_per_token: int | None = Field(default=None, ge=0)
    """KV-cache bytes one token takes (2 x layers x KV heads x head size x element size),
    when known: what moving a prompt's KV to another peer costs."""
    layers: int | None = Field(default=None, ge=1, le=4096)
    """Transformer blocks (a GGUF's block_count), when known: a model too large for one peer
    is split across peers by whole layers."""


class KVEventsSource(Model):
    """A ZMQ publisher of KV events in vLLM's format (`edgellm worker --kv-events`, or vLLM's
    --kv-events-config)."""

    endpoint: str = Field(pattern=r"^tcp://\S+:[0-9]+$", max_length=512)
    """The address subscribers connect to, such as tcp://192.168.1.20:5557."""
    topic: str = Field(default="", max_length=253)
    """The topic of the events; vLLM's default is the empty topic."""


class RPCServer(Model):
    """The peer's llama.cpp RPC server (`edgellm stage`), which holds and computes layers of a
    model split across peers. It has no authentication: offer it on trusted links only."""

    endpoint: str = Field(pattern=r"^[A-Za-z0-9.-]+:[0-9]{1,5}$", max_length=260)
    """host:port that the peer leading a split connects to, e.g. 192.168.1.21:50052."""


class PeerNodeSpec(Model):
    """What the peer offers. Written by `edgellm join` or by the operator for labelled Nodes."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!('vllm' in self.backends) || (has(self.resources.accelerators) &&"
                    " self.resources.accelerators.exists(a, a.vendor in ['nvidia', 'amd']))",
                    "the vllm backend needs an nvidia or amd accelerator in resources.accelerators",
                    ".backends",
                )
            ]
        }
    )

    cluster: ClusterName = Field(
        pattern=DNS_LABEL_PATTERN,
        max_length=63,
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("self == oldSelf", "cluster is immutable: a peer belongs to one cluster")
            ]
        },
    )
    """The federation member cluster that owns this peer; other members hold read-only mirrors."""
    endpoint: str = Field(pattern=r"^https?://[^\s/]+(/\S*)?$", max_length=2048)
    """URL of the peer's worker API, e.g. http://10.0.0.5:8600."""
    roles: list[Role] = Field(
        min_length=1, max_length=2, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Which phases of inference the peer serves: prefill, decode or both."""
    backends: list[Backend] = Field(
        min_length=1, max_length=2, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Inference engines the peer can run: llamacpp (CPUs, small GPUs) and vllm (GPUs)."""
    resources: PeerResources
    """CPU, memory and accelerators the peer gives to workers."""
    network: PeerNetwork = Field(default_factory=PeerNetwork)
    """The peer's measured or declared link."""
    models: list[LocalModel] = Field(default_factory=list, max_length=256)
    """Models the peer holds locally and can load without downloading."""
    ipfs_peer_id: str | None = Field(default=None, alias="ipfsPeerID", pattern=IPFS_PEER_ID_PATTERN)
    """The peer's IPFS (Kubo) id, for sharing KV-cache blocks."""
    kv_events: KVEventsSource | None = None
    """Where the peer's worker publishes its KV events, which schedulers index to send a
    prompt to the peer that holds its prefix."""
    rpc_server: RPCServer | None = None
    """Where the peer lends its memory and cores to models too large for any one peer: its
    llama.cpp RPC server; absent for a peer that does not."""
    trust_level: TrustLevel = "community"
    """How far requests may trust this peer with their prompts: untrusted, community, trusted."""
    unschedulable: bool = False
    """True while the peer drains: it takes no new requests and finishes those it has."""
    heartbeat_ttl_seconds: int = Field(default=30, alias="heartbeatTTLSeconds", ge=5, le=3600)
    """A peer whose last heartbeat is older than this is no longer Ready."""

    @model_validator(mode="after")
    def _vllm_needs_a_gpu(self) -> Self:
        if "vllm" in self.backends and not any(
            a.vendor in VLLM_VENDORS for a in self.resources.accelerators
        ):
            raise ValueError(
                "the vllm backend needs an nvidia or amd accelerator in resources.accelerators"
            )
        return self


class PeerLoad(Model):
    """The peer's work at its last heartbeat."""

    running_requests: int = Field(default=0, ge=0)
    """Requests being prefilled or decoded now."""
    queued_requests: int = Field(default=0, ge=0)
    """Requests waiting for a slot."""
    kv_cache_usage: float = Field(default=0.0, ge=0.0, le=1.0)
    """Fraction of the KV cache in use, 0 to 1."""
    tokens_per_second: float = Field(default=0.0, ge=0.0)
    """Generated tokens per second, averaged over the last interval."""
    prefill_tokens_per_second: float = Field(default=0.0, ge=0.0)
    """Prompt tokens computed per second, averaged over the last interval; 0 when unknown."""


class PeerNodeStatus(Model):
    """What the operator last saw of the peer."""

    conditions: list[Condition] = conditions_field(
        "Ready (can take requests), Reachable (its cluster answers), Draining (unschedulable with"
        " work left)."
    )
    last_heartbeat_time: datetime | None = None
    """When the peer last reported in."""
    load: PeerLoad = Field(default_factory=PeerLoad)
    """The peer's work at its last heartbeat."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the status was computed from."""


class PeerNode(Model):
    """A machine of the federation that can run prefill or decode workers."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["edgellm.io/v1alpha1"] = API_VERSION
    kind: Literal["PeerNode"] = "PeerNode"
    metadata: ObjectMeta
    spec: PeerNodeSpec
    status: PeerNodeStatus = Field(default_factory=PeerNodeStatus)
