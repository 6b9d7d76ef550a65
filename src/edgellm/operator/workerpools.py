"""What a WorkerPool wants and how it stands: its size for a demand, its Deployment, its status.

Pure: the operator's pool loop (`poolreconciler.py`) counts the demand, calls `deployment` and
server-side applies the result, then calls `pool_status` with what the Deployment and its pods
report, and writes the status and Events it returns.
"""

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from edgellm.api import API_VERSION, ConditionStatus, WorkerPool, set_condition
from edgellm.api.inferencerequest import TERMINAL_PHASES
from edgellm.api.workerpool import WorkerPoolStatus
from edgellm.operator.nodepeers import WORKER_PORT
from edgellm.operator.peerhealth import EventType, Transition

Body = dict[str, Any]

POOL_LABEL = "edgellm.io/worker-pool"
ROLE_LABEL = "edgellm.io/role"
BACKEND_LABEL = "edgellm.io/backend"
MODEL_ANNOTATION = "edgellm.io/model"  # model names may be longer than a label value allows
GPU_RESOURCE = "nvidia.com/gpu"
MODEL_DIR = "/models"
# `edgellm model <command>` writes each generated model.
GENERATE_COMMANDS = {"tiny-random": "tiny", "bench-random": "bench"}
# A worker told to stop (SIGTERM) takes no new requests and finishes those it has for this long;
# the pod's grace period leaves it time to exit before the kubelet kills it.
DRAIN_SECONDS = 25
TERMINATION_GRACE_SECONDS = DRAIN_SECONDS + 5
# The UID distroless and many slim images call `nonroot`; runAsNonRoot needs a numeric one.
WORKER_UID = 65532
# A label value holds at most 63 characters, and every worker pod is labelled with the pool.
MAX_POOL_NAME = 63
# Reasons of conditions that a user has to act on: posted as Warning Events.
WARNING_REASONS = frozenset(
    {"Unschedulable", "ReplicaFailure", "DeploymentConflict", "InvalidSpec", "NameTooLong"}
)


def _package_version() -> str:
    try:
        return version("edgellm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "latest"


DEFAULT_IMAGE = f"ghcr.io/edgellm/worker:{_package_version()}"


def desired_replicas(pool: WorkerPool, demand: int) -> int:
    """One worker per `requestsPerReplica` unfinished requests, within min and max."""
    spec = pool.spec
    wanted = math.ceil(demand / spec.requests_per_replica)
    return max(spec.min_replicas, min(spec.max_replicas, wanted))


def demand_by_model(requests: Iterable[Body]) -> Counter[tuple[str, str]]:
    """Unfinished InferenceRequests per (namespace, model); one without a phase is Pending, one
    being deleted is being cancelled and no longer counts."""
    demand: Counter[tuple[str, str]] = Counter()
    for body in requests:
        if (body.get("status") or {}).get("phase", "Pending") in TERMINAL_PHASES:
            continue
        if body["metadata"].get("deletionTimestamp"):
            continue
        model = (body.get("spec") or {}).get("model")
        namespace = body["metadata"].get("namespace")
        if model and namespace:
            demand[(namespace, model)] += 1
    return demand


def labels(pool: WorkerPool) -> dict[str, str]:
    """The labels of the pool's Deployment and worker pods; POOL_LABEL alone selects them."""
    return {
        "app.kubernetes.io/name": "edgellm-worker",
        "app.kubernetes.io/instance": pool.metadata.name,
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/part-of": "edgellm",
        "app.kubernetes.io/managed-by": "edgellm-operator",
        POOL_LABEL: pool.metadata.name,
        ROLE_LABEL: pool.spec.role,
        BACKEND_LABEL: pool.spec.backend,
    }


def owner_reference(pool: WorkerPool) -> Body:
    """Makes the pool the Deployment's controller: the garbage collector deletes the Deployment
    (and so its pods) with the pool, and foreground deletion of the pool waits for them."""
    return {
        "apiVersion": API_VERSION,
        "kind": "WorkerPool",
        "name": pool.metadata.name,
        "uid": pool.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_owned(deployment: Body, pool: WorkerPool) -> bool:
    """Whether this pool (this very object, not an earlier one of the same name) controls it."""
    return any(
        ref.get("uid") == pool.metadata.uid and ref.get("controller")
        for ref in deployment["metadata"].get("ownerReferences") or []
    )


def cpu_cores(quantity: int | str) -> float:
    """Cores in a CPU quantity: 2, "1.5", "500m", "2e0"; 1 for forms no one uses for CPUs."""
    if isinstance(quantity, int):
        return float(quantity)
    try:
        if quantity.endswith("m"):
            return float(quantity[:-1]) / 1000
        return float(quantity)
    except ValueError:
        return 1.0


def _command(pool: WorkerPool, model_path: str) -> list[str]:
    spec = pool.spec
    command = ["edgellm", "worker"]
    if spec.backend == "vllm":
        # For the vLLM backend of `edgellm worker` (src/edgellm/worker/vllm.py, being written):
        # the same command with `--backend vllm`; it launches `vllm serve` itself.
        command += ["--backend", "vllm"]
    command += [
        f"--model={model_path}",
        f"--name={spec.model}",
        "--host=0.0.0.0",
        f"--port={WORKER_PORT}",
        f"--drain-timeout={DRAIN_SECONDS}",
    ]
    if spec.backend == "llamacpp":
        # As many threads as cores requested: more would only be throttled.
        command.append(f"--threads={max(1, int(cpu_cores(spec.resources.cpu)))}")
    return command


def _resources(pool: WorkerPool) -> Body:
    wanted = pool.spec.resources
    requests: dict[str, Any] = {"cpu": wanted.cpu, "memory": wanted.memory}
    # No CPU limit (it throttles and gains nothing); memory is limited to the request, so a
    # worker that outgrows it is restarted rather than squeezing its neighbours.
    limits: dict[str, Any] = {"memory": wanted.memory}
    if wanted.gpus:
        # Extended resources are not overcommitted: requests and limits must be equal.
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(wanted.gpus)
    return {"requests": requests, "limits": limits}


def _tolerations(pool: WorkerPool) -> list[Body]:
    tolerations = [t.to_wire() for t in pool.spec.tolerations]
    if pool.spec.resources.gpus and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        # What the ExtendedResourceToleration admission plugin adds where it is enabled.
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _probe(period: int, failures: int) -> Body:
    return {
        "httpGet": {"path": "/healthz", "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


_RESTRICTED_CONTAINER: Body = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass(frozen=True)
class ModelMount:
    """How the weights reach a worker: the path it loads, its volume and mount, and the init
    container that writes them first, if any."""

    path: str
    volume: Body
    mount: Body
    init: Body | None = None


def model_mount(pool: WorkerPool, image: str) -> ModelMount:
    source = pool.spec.source
    if source.path is not None:  # one file (or model folder) on the node, mounted as itself
        path = f"{MODEL_DIR}/{source.path.rsplit('/', 1)[-1]}"
        kind = "Directory" if pool.spec.backend == "vllm" else "File"
        return ModelMount(
            path,
            {"name": "model", "hostPath": {"path": source.path, "type": kind}},
            {"name": "model", "mountPath": path, "readOnly": True},
        )
    read_only = {"name": "model", "mountPath": MODEL_DIR, "readOnly": True}
    if source.persistent_volume_claim is not None:
        claim = source.persistent_volume_claim
        return ModelMount(
            f"{MODEL_DIR}/{claim.path}",
            {
                "name": "model",
                "persistentVolumeClaim": {"claimName": claim.claim_name, "readOnly": True},
            },
            read_only,
        )
    assert source.generated is not None  # the spec's validation guarantees one source
    path = f"{MODEL_DIR}/{source.generated}.gguf"
    init = {
        "name": "model",
        "image": pool.spec.image or image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["edgellm", "model", GENERATE_COMMANDS[source.generated], f"--out={path}"],
        "resources": _resources(pool),
        "securityContext": _RESTRICTED_CONTAINER,
        "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR}],
    }
    return ModelMount(path, {"name": "model", "emptyDir": {}}, read_only, init)


def deployment(pool: WorkerPool, replicas: int, image: str = DEFAULT_IMAGE) -> Body:
    """The apps/v1 Deployment that runs the pool's workers, for server-side apply."""
    spec = pool.spec
    model = model_mount(pool, image)
    pool_labels = labels(pool)
    mounts = [model.mount, {"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[Body] = [
        model.volume,
        # The root filesystem is read-only; the worker's caches go here (HOME points here).
        {"name": "tmp", "emptyDir": {}},
    ]
    env = [{"name": "HOME", "value": "/tmp"}]
    if spec.backend == "vllm":
        # NCCL and vLLM's tensor parallelism exchange data through shared memory.
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        # vLLM's prefix-cache hashes must agree across workers (see DESIGN.md).
        env.append({"name": "PYTHONHASHSEED", "value": "0"})
    container = {
        "name": "worker",
        "image": spec.image or image,
        "imagePullPolicy": "IfNotPresent",
        "command": _command(pool, model.path),
        "env": env,
        "ports": [{"name": "http", "containerPort": WORKER_PORT, "protocol": "TCP"}],
        "resources": _resources(pool),
        # Loading a large model takes minutes: the startup probe holds the others back.
        "startupProbe": _probe(period=5, failures=120),
        "readinessProbe": _probe(period=5, failures=2),
        "livenessProbe": _probe(period=10, failures=3),
        "securityContext": _RESTRICTED_CONTAINER,
        "volumeMounts": mounts,
    }
    pod_spec: Body = {
        # Workers never call the Kubernetes API: no token in the pod.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": [container],
        "volumes": volumes,
    }
    if model.init is not None:
        pod_spec["initContainers"] = [model.init]
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    tolerations = _tolerations(pool)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    # GPUs are scarce: a surge pod would wait for a GPU the old pod holds. Replace in place.
    rollout = (
        {"maxSurge": 0, "maxUnavailable": 1}
        if spec.resources.gpus
        else {"maxSurge": 1, "maxUnavailable": 0}
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": pool.metadata.name,
            "namespace": pool.metadata.namespace,
            "labels": pool_labels,
            "annotations": {MODEL_ANNOTATION: spec.model},
            "ownerReferences": [owner_reference(pool)],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {POOL_LABEL: pool.metadata.name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rollout},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": pool_labels, "annotations": {MODEL_ANNOTATION: spec.model}},
                "spec": pod_spec,
            },
        },
    }


@dataclass(frozen=True)
class PoolAssessment:
    status: WorkerPoolStatus
    transitions: list[Transition] = field(default_factory=list)
    blocked: bool = False  # the operator cannot run the pool's workers (blocked_status says why)


def pod_ready(pod: Body) -> bool:
    """Whether the kubelet's readiness probe (the worker's /healthz) passes."""
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def pod_terminating(pod: Body) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def _unschedulable(pods: list[Body]) -> list[str]:
    """The scheduler's message for each live pod it could not place."""
    messages = []
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                messages.append(condition.get("message") or "no node fits")
    return messages


def _deployment_condition(deployment: Body, type_: str) -> Body | None:
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_:
            return dict(condition)
    return None


class _Conditions:
    """Sets conditions on a status and records a Transition for each that changed."""

    def __init__(self, status: WorkerPoolStatus, now: datetime, generation: int | None) -> None:
        self.status = status
        self.now = now
        self.generation = generation
        self.transitions: list[Transition] = []

    def set(self, type_: str, value: ConditionStatus, reason: str, message: str) -> None:
        self.status.conditions, changed = set_condition(
            self.status.conditions, type_, value, reason, message, self.now, self.generation
        )
        if changed:
            event_type: EventType = "Warning" if reason in WARNING_REASONS else "Normal"
            self.transitions.append(Transition(event_type, reason, f"{type_}={value}: {message}"))


def _workers(count: int) -> str:
    return f"{count} worker{'' if count == 1 else 's'}"


def pool_status(
    pool: WorkerPool,
    demand: int,
    deployment: Body | None,
    pods: list[Body],
    now: datetime,
) -> PoolAssessment:
    """The pool's status from its demand, its Deployment and the Deployment's pods, and the
    transitions worth an Event (desired size and conditions)."""
    previous = pool.status
    desired = desired_replicas(pool, demand)
    observed = (deployment or {}).get("status") or {}
    status = WorkerPoolStatus(
        replicas=observed.get("replicas") or 0,
        ready_replicas=observed.get("readyReplicas") or 0,
        desired_replicas=desired,
        demand=demand,
        conditions=list(previous.conditions),
        observed_generation=pool.metadata.generation,
    )
    conditions = _Conditions(status, now, pool.metadata.generation)
    transitions: list[Transition] = []
    if desired != previous.desired_replicas:
        spec = pool.spec
        grew = desired > previous.desired_replicas
        transitions.append(
            Transition(
                "Normal",
                "ScaledUp" if grew else "ScaledDown",
                f"{_workers(desired)} for {demand} unfinished request(s)"
                f" ({spec.requests_per_replica} per worker,"
                f" between {spec.min_replicas} and {spec.max_replicas})",
            )
        )

    ready = status.ready_replicas
    # Available counts the pods of this very listing, which the pool loop has just registered
    # and heartbeated as peers: a pool that says Available can be scheduled onto.
    serving = sum(1 for pod in pods if pod_ready(pod) and not pod_terminating(pod))
    unschedulable = _unschedulable(pods)
    failure = _deployment_condition(deployment or {}, "ReplicaFailure")
    progress = f"{ready} of {_workers(desired)} ready"
    if failure is not None and failure.get("status") == "True":
        conditions.set(
            "Scaled", "False", "ReplicaFailure", failure.get("message") or "pods cannot be created"
        )
    elif unschedulable:
        conditions.set(
            "Scaled",
            "False",
            "Unschedulable",
            f"{progress}; {len(unschedulable)} cannot be placed: {unschedulable[0]}",
        )
    elif ready == desired and status.replicas == desired:
        conditions.set("Scaled", "True", "DesiredReplicasReady", progress)
    elif status.replicas > desired:
        conditions.set("Scaled", "False", "ScalingDown", progress)
    else:
        conditions.set("Scaled", "False", "WorkersStarting", progress)

    if serving:
        conditions.set("Available", "True", "WorkersReady", f"{_workers(serving)} ready")
    elif desired == 0:
        conditions.set(
            "Available", "False", "ScaledToZero", "no unfinished requests and minReplicas is 0"
        )
    else:
        conditions.set("Available", "False", "NoWorkerReady", f"no worker ready yet: {progress}")
    return PoolAssessment(status, transitions + conditions.transitions)


def blocked_status(
    previous: WorkerPoolStatus,
    generation: int | None,
    reason: str,
    message: str,
    now: datetime,
) -> PoolAssessment:
    """The status of a pool whose workers the operator cannot run (an invalid spec, a name too
    long for a label, a Deployment of that name that is not the pool's): Scaled=False, saying why;
    the rest as it was."""
    status = previous.model_copy(deep=True)
    status.observed_generation = generation
    conditions = _Conditions(status, now, generation)
    conditions.set("Scaled", "False", reason, message)
    return PoolAssessment(status, conditions.transitions, blocked=True)
