"""`WorkerPool`: warm prefill/decode workers for one model, kept on suitable cluster nodes.

Namespaced. A user (`kubectl apply`) writes the spec; the operator keeps a Deployment of worker
pods owned by the pool, sized by the demand for the model (unfinished InferenceRequests in the
pool's namespace), and writes the status.
"""

from typing import Literal, Self

from pydantic import ConfigDict, Field, model_validator

from edgellm.api._common import (
    API_VERSION,
    DNS_SUBDOMAIN_PATTERN,
    Condition,
    Model,
    ModelName,
    ObjectMeta,
    Quantity,
    cel,
    conditions_field,
)
from edgellm.api.peernode import Backend

WorkerRole = Literal["prefill", "decode", "both"]
TolerationOperator = Literal["Exists", "Equal"]
TaintEffect = Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"]

# Absolute, no empty segments, a conservative character set: it becomes a hostPath and a
# command-line argument. `..` segments are refused separately (Go's regexps have no lookahead).
MODEL_PATH_PATTERN = r"^(/[A-Za-z0-9._@+=-]+)+$"
NO_PARENT_SEGMENTS = "path may not contain '..' segments"
MIN_NOT_ABOVE_MAX = "minReplicas must not exceed maxReplicas"
VLLM_NEEDS_GPUS = "the vllm backend needs resources.gpus of at least 1"
GENERATED_IS_GGUF = "generated models are GGUF files: they need the llamacpp backend"
EXACTLY_ONE_SOURCE = "exactly one of path, persistentVolumeClaim or generated must be set"
_NO_PARENT_RULE = "!self.path.contains('/../') && !self.path.endsWith('/..')"
# The random-weight models `edgellm model` writes (worker/models.py's SHAPES).
GeneratedModel = Literal["tiny-random", "bench-random"]


def _no_parent_segments(path: str) -> str:
    if ".." in path.split("/"):
        raise ValueError(NO_PARENT_SEGMENTS)
    return path


class VolumeModel(Model):
    """Weights on a PersistentVolumeClaim of the pool's namespace, mounted read-only."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!self.path.contains('/../') && !self.path.startsWith('../')"
                    " && self.path != '..'",
                    NO_PARENT_SEGMENTS,
                    ".path",
                )
            ]
        }
    )

    claim_name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """The PersistentVolumeClaim, in the pool's namespace, that holds the weights; its volume
    must allow the pool's nodes to mount it (ReadOnlyMany or ReadWriteMany across nodes)."""
    path: str = Field(pattern=r"^[A-Za-z0-9._@+=-]+(/[A-Za-z0-9._@+=-]+)*$", max_length=4096)
    """The weights' path inside the volume: a GGUF file for llamacpp, a model directory for
    vllm, e.g. models/qwen2.5-0.5b-instruct-q4_k_m.gguf."""

    @model_validator(mode="after")
    def _no_parent(self) -> Self:
        _no_parent_segments(self.path)
        return self


class ModelSource(Model):
    """Where the workers find the model's weights: exactly one of a path on every node, a
    PersistentVolumeClaim, or a generated random-weight model."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "[has(self.path), has(self.persistentVolumeClaim), has(self.generated)]"
                    ".filter(x, x).size() == 1",
                    EXACTLY_ONE_SOURCE,
                ),
                cel(f"!has(self.path) || ({_NO_PARENT_RULE})", NO_PARENT_SEGMENTS, ".path"),
            ]
        }
    )

    path: str | None = Field(default=None, pattern=MODEL_PATH_PATTERN, max_length=4096)
    """Absolute path of the weights on the node: a GGUF file for llamacpp, a model directory
    for vllm. It is mounted read-only into the worker (a hostPath volume), so every node the
    pool may use must hold it there, e.g. written by `edgellm model tiny` or a shared mount.
    Namespaces that enforce the restricted Pod Security Standard refuse hostPath volumes."""
    persistent_volume_claim: VolumeModel | None = None
    """Weights on a PersistentVolumeClaim of the pool's namespace, mounted read-only; allowed
    under the restricted Pod Security Standard."""
    generated: GeneratedModel | None = None
    """A random-weight model that each worker writes before it starts (`edgellm model`),
    for demos and tests: tiny-random (under 1 MiB) or bench-random (~45 MiB). llamacpp only;
    its output is noise, its timings and KV sizes are real."""

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if [self.path, self.persistent_volume_claim, self.generated].count(None) != 2:
            raise ValueError(EXACTLY_ONE_SOURCE)
        if self.path is not None:
            _no_parent_segments(self.path)
        return self


class WorkerResources(Model):
    """What each worker pod asks of its node."""

    cpu: Quantity = "1"
    """CPU cores each worker requests, e.g. 2 or 500m; llama.cpp uses that many threads."""
    memory: Quantity = "2Gi"
    """Memory each worker requests, and may not exceed, e.g. 8Gi."""
    gpus: int = Field(default=0, ge=0, le=16)
    """NVIDIA GPUs each worker needs (requests and limits of nvidia.com/gpu); 0 for CPU only."""


class Toleration(Model):
    """A node taint the workers tolerate, as in a pod's tolerations."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.operator == 'Equal' || self.value == ''",
                    "value must be empty when operator is Exists",
                    ".value",
                ),
                cel(
                    "self.operator == 'Exists' || self.key != ''",
                    "an empty key tolerates every taint and needs operator Exists",
                    ".key",
                ),
            ]
        }
    )

    key: str = Field(default="", max_length=317)
    """The taint key; empty with operator Exists tolerates every taint."""
    operator: TolerationOperator = "Equal"
    """Exists (any value) or Equal (the value below)."""
    value: str = Field(default="", max_length=63)
    """The taint value to match with operator Equal."""
    effect: TaintEffect = ""
    """The taint effect to match: NoSchedule, PreferNoSchedule, NoExecute; empty for all."""
    toleration_seconds: int | None = Field(default=None, ge=0)
    """With effect NoExecute: how long a worker stays on a node after the taint appears."""

    @model_validator(mode="after")
    def _operator_fits(self) -> Self:
        if self.operator == "Exists" and self.value:
            raise ValueError("value must be empty when operator is Exists")
        if self.operator == "Equal" and not self.key:
            raise ValueError("an empty key tolerates every taint and needs operator Exists")
        return self


class WorkerPoolSpec(Model):
    """The workers wanted for a model."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("self.minReplicas <= self.maxReplicas", MIN_NOT_ABOVE_MAX, ".minReplicas"),
                cel(
                    "self.backend != 'vllm' || self.resources.gpus >= 1",
                    VLLM_NEEDS_GPUS,
                    ".backend",
                ),
                cel(
                    "self.backend != 'vllm' || !has(self.source.generated)",
                    GENERATED_IS_GGUF,
                    ".source.generated",
                ),
            ]
        }
    )

    model: ModelName = Field(min_length=1, max_length=253)
    """The model name requests use; the workers serve it under this name, and unfinished
    InferenceRequests for it in this namespace are the pool's demand."""
    source: ModelSource
    """Where the workers find the model's weights."""
    role: WorkerRole = "both"
    """Which phases of inference the workers serve: prefill, decode or both."""
    backend: Backend = "llamacpp"
    """The inference engine: llamacpp (CPUs, small GPUs) or vllm (needs gpus >= 1)."""
    image: str | None = Field(default=None, min_length=1, max_length=1024)
    """The worker's container image; empty for the operator's own version of
    ghcr.io/edgellm/worker."""
    resources: WorkerResources = Field(default_factory=WorkerResources)
    """CPU, memory and GPUs of each worker."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels a worker's node must carry, e.g. nvidia.com/gpu.present: "true"."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Node taints the workers tolerate. Workers with gpus also tolerate nvidia.com/gpu
    NoSchedule taints, as GPU nodes commonly carry."""
    min_replicas: int = Field(default=1, ge=0, le=1000)
    """Workers kept warm even without demand; 0 lets the pool scale to zero."""
    max_replicas: int = Field(default=4, ge=1, le=1000)
    """The most workers, however high the demand."""
    requests_per_replica: int = Field(default=4, ge=1, le=10000)
    """Unfinished requests one worker is meant to carry: the pool wants demand divided by
    this, rounded up, within minReplicas and maxReplicas."""

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(MIN_NOT_ABOVE_MAX)
        if self.backend == "vllm" and self.resources.gpus < 1:
            raise ValueError(VLLM_NEEDS_GPUS)
        if self.backend == "vllm" and self.source.generated is not None:
            raise ValueError(GENERATED_IS_GGUF)
        return self


class WorkerPoolStatus(Model):
    """What the operator last saw of the pool's workers."""

    replicas: int = Field(default=0, ge=0)
    """Worker pods the pool's Deployment has, ready or not."""
    ready_replicas: int = Field(default=0, ge=0)
    """Worker pods that answer their health check."""
    desired_replicas: int = Field(default=0, ge=0)
    """Workers the pool wants for its current demand."""
    demand: int = Field(default=0, ge=0)
    """Unfinished InferenceRequests for the model in the pool's namespace."""
    conditions: list[Condition] = conditions_field(
        "Available (at least one worker is ready), Scaled (the desired workers are all ready;"
        " reason Unschedulable when no node can take them)."
    )
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the status was computed from."""


class WorkerPool(Model):
    """Warm prefill/decode workers for one model, kept on suitable cluster nodes."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["edgellm.io/v1alpha1"] = API_VERSION
    kind: Literal["WorkerPool"] = "WorkerPool"
    metadata: ObjectMeta
    spec: WorkerPoolSpec
    status: WorkerPoolStatus = Field(default_factory=WorkerPoolStatus)
