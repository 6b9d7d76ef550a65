"""A WorkerPool: its rules, its size for a demand, the Deployment it runs, and the status read
back from that Deployment and its pods."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from edgellm.api import WorkerPool, WorkerPoolSpec, condition_status
from edgellm.operator.workerpools import (
    POOL_LABEL,
    blocked_status,
    cpu_cores,
    demand_by_model,
    deployment,
    desired_replicas,
    is_owned,
    pool_status,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SPEC: dict[str, Any] = {
    "model": "qwen2.5-0.5b-instruct",
    "source": {"path": "/var/lib/edgellm/models/qwen2.5-0.5b-instruct.gguf"},
}


def _pool(name: str = "qwen", **spec: Any) -> WorkerPool:
    return WorkerPool.model_validate(
        {
            "metadata": {"name": name, "namespace": "team-a", "uid": "pool-uid", "generation": 3},
            "spec": {**SPEC, **spec},
        }
    )


def _deployment_status(replicas: int, ready: int, conditions: list[Any] | None = None) -> Any:
    return {
        "metadata": {"name": "qwen", "ownerReferences": [{"uid": "pool-uid", "controller": True}]},
        "status": {"replicas": replicas, "readyReplicas": ready, "conditions": conditions or []},
    }


def _pod(scheduled: bool = True, message: str = "", ready: bool | None = None) -> dict[str, Any]:
    condition = (
        {"type": "PodScheduled", "status": "True"}
        if scheduled
        else {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
        }
    )
    readiness = {"type": "Ready", "status": "True" if scheduled and ready is not False else "False"}
    return {"metadata": {"name": "qwen-abc"}, "status": {"conditions": [condition, readiness]}}


# --- the resource's rules ---------------------------------------------------------------------


def test_a_pool_defaults_to_one_warm_llamacpp_worker_serving_both_phases() -> None:
    spec = WorkerPoolSpec.model_validate(SPEC)
    assert (spec.role, spec.backend, spec.min_replicas, spec.max_replicas) == (
        "both",
        "llamacpp",
        1,
        4,
    )
    assert (spec.resources.cpu, spec.resources.memory, spec.resources.gpus) == ("1", "2Gi", 0)
    assert spec.image is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"minReplicas": 3, "maxReplicas": 2}, "minReplicas must not exceed maxReplicas"),
        ({"backend": "vllm"}, "the vllm backend needs resources.gpus of at least 1"),
        ({"source": {"path": "/models/../etc/shadow"}}, "may not contain '..' segments"),
        ({"source": {"path": "models/tiny.gguf"}}, "should match pattern"),
        ({"source": {}}, "exactly one of path, persistentVolumeClaim or generated"),
        (
            {"source": {"path": "/m/a.gguf", "generated": "tiny-random"}},
            "exactly one of path, persistentVolumeClaim or generated",
        ),
        (
            {"source": {"persistentVolumeClaim": {"claimName": "models", "path": "a/../../b"}}},
            "may not contain '..' segments",
        ),
        ({"source": {"generated": "huge-random"}}, "'tiny-random' or 'bench-random'"),
        (
            {"backend": "vllm", "resources": {"gpus": 1}, "source": {"generated": "tiny-random"}},
            "generated models are GGUF files",
        ),
        (
            {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}]},
            "value must be empty when operator is Exists",
        ),
        ({"tolerations": [{"value": "yes"}]}, "an empty key tolerates every taint"),
        ({"resources": {"gpus": -1}}, "greater than or equal to 0"),
        ({"requestsPerReplica": 0}, "greater than or equal to 1"),
    ],
)
def test_what_the_crd_refuses_the_model_refuses_too(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        WorkerPoolSpec.model_validate({**SPEC, **change})


def test_a_vllm_pool_with_a_gpu_is_accepted() -> None:
    spec = WorkerPoolSpec.model_validate({**SPEC, "backend": "vllm", "resources": {"gpus": 2}})
    assert spec.resources.gpus == 2


def test_the_shipped_example_is_a_cpu_pool_that_writes_its_own_model() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "workerpool.yaml"
    pool = WorkerPool.model_validate(yaml.safe_load(example.read_text()))
    assert pool.spec.resources.gpus == 0
    assert pool.spec.model == pool.spec.source.generated == "tiny-random"


# --- size for a demand -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("demand", "desired"),
    [(0, 1), (1, 1), (4, 1), (5, 2), (12, 3), (13, 4), (1000, 4)],
)
def test_desired_replicas_are_demand_per_worker_rounded_up_within_min_and_max(
    demand: int, desired: int
) -> None:
    assert desired_replicas(_pool(), demand) == desired


def test_a_pool_with_min_zero_scales_to_zero_without_demand() -> None:
    pool = _pool(minReplicas=0, requestsPerReplica=2)
    assert desired_replicas(pool, 0) == 0
    assert desired_replicas(pool, 3) == 2


def test_demand_counts_unfinished_requests_per_namespace_and_model() -> None:
    def request(namespace: str, model: str, phase: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "metadata": {"namespace": namespace, "name": "r"},
            "spec": {"model": model},
        }
        if phase:
            body["status"] = {"phase": phase}
        return body

    requests = [
        request("team-a", "qwen", None),  # just created: no status yet, so Pending
        request("team-a", "qwen", "Pending"),
        request("team-a", "qwen", "Scheduled"),
        request("team-a", "qwen", "Running"),
        request("team-a", "qwen", "Succeeded"),
        request("team-a", "qwen", "Failed"),
        request("team-a", "qwen", "Cancelled"),
        request("team-b", "qwen", "Running"),
        request("team-a", "llama", "Running"),
    ]
    cancelled = request("team-a", "qwen", "Running")
    cancelled["metadata"]["deletionTimestamp"] = NOW.isoformat()
    requests.append(cancelled)
    demand = demand_by_model(requests)
    assert demand == {("team-a", "qwen"): 4, ("team-b", "qwen"): 1, ("team-a", "llama"): 1}


# --- the Deployment ----------------------------------------------------------------------------


def test_the_deployment_is_controlled_by_the_pool_and_selects_its_workers() -> None:
    manifest = deployment(_pool(), 2)
    assert manifest["apiVersion"] == "apps/v1"
    assert manifest["kind"] == "Deployment"
    assert manifest["metadata"]["name"] == "qwen"
    assert manifest["metadata"]["namespace"] == "team-a"
    assert manifest["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "edgellm.io/v1alpha1",
            "kind": "WorkerPool",
            "name": "qwen",
            "uid": "pool-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    spec = manifest["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"] == {"matchLabels": {POOL_LABEL: "qwen"}}
    template_labels = spec["template"]["metadata"]["labels"]
    assert template_labels[POOL_LABEL] == "qwen"
    assert template_labels["edgellm.io/role"] == "both"
    assert spec["template"]["metadata"]["annotations"]["edgellm.io/model"] == SPEC["model"]


def test_a_llamacpp_worker_serves_the_mounted_model_under_the_pools_model_name() -> None:
    manifest = deployment(_pool(resources={"cpu": "2500m", "memory": "4Gi"}), 1)
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == [
        "edgellm",
        "worker",
        "--model=/models/qwen2.5-0.5b-instruct.gguf",
        "--name=qwen2.5-0.5b-instruct",
        "--host=0.0.0.0",
        "--port=8600",
        "--drain-timeout=25",
        "--threads=2",
    ]
    assert container["image"].startswith("ghcr.io/edgellm/worker:")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "model")
    assert mount == {
        "name": "model",
        "mountPath": "/models/qwen2.5-0.5b-instruct.gguf",
        "readOnly": True,
    }
    volume = next(v for v in pod["volumes"] if v["name"] == "model")
    assert volume["hostPath"] == {"path": SPEC["source"]["path"], "type": "File"}
    assert container["resources"] == {
        "requests": {"cpu": "2500m", "memory": "4Gi"},
        "limits": {"memory": "4Gi"},
    }
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod
    assert "initContainers" not in pod
    # The worker drains (--drain-timeout) within the pod's grace period.
    assert pod["terminationGracePeriodSeconds"] > 25


def test_a_model_on_a_volume_claim_is_mounted_read_only_from_it() -> None:
    source = {"persistentVolumeClaim": {"claimName": "models", "path": "qwen/q4.gguf"}}
    pod = deployment(_pool(source=source), 1)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "--model=/models/qwen/q4.gguf" in container["command"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert "initContainers" not in pod


def test_a_generated_model_is_written_by_an_init_container_into_a_volume_of_the_pod() -> None:
    pool = _pool(source={"generated": "bench-random"}, image="registry.example/worker:dev")
    pod = deployment(pool, 1)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (container,) = pod["containers"]
    assert init["command"] == ["edgellm", "model", "bench", "--out=/models/bench-random.gguf"]
    assert init["image"] == container["image"] == "registry.example/worker:dev"
    assert init["volumeMounts"] == [{"name": "model", "mountPath": "/models"}]
    assert init["securityContext"] == container["securityContext"]
    assert "--model=/models/bench-random.gguf" in container["command"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == "model")
    assert volume == {"name": "model", "emptyDir": {}}


def test_a_gpu_worker_requests_and_is_limited_to_its_gpus_and_tolerates_gpu_taints() -> None:
    pool = _pool(
        resources={"cpu": 4, "memory": "16Gi", "gpus": 1},
        nodeSelector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "dedicated", "value": "llm", "effect": "NoSchedule"}],
        image="registry.example/worker:dev",
    )
    manifest = deployment(pool, 1)
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["requests"] == {
        "cpu": 4,
        "memory": "16Gi",
        "nvidia.com/gpu": "1",
    }
    assert container["resources"]["limits"] == {"memory": "16Gi", "nvidia.com/gpu": "1"}
    assert container["image"] == "registry.example/worker:dev"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    ]
    # No surge: a second pod would wait for the GPU the first one holds.
    assert manifest["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_a_vllm_worker_gets_the_backend_flag_a_model_directory_and_shared_memory() -> None:
    pool = _pool(
        backend="vllm",
        source={"path": "/srv/models/Qwen2.5-7B-Instruct"},
        resources={"gpus": 2},
    )
    pod = deployment(pool, 1)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:4] == ["edgellm", "worker", "--backend", "vllm"]
    assert "--model=/models/Qwen2.5-7B-Instruct" in container["command"]
    assert not any(arg.startswith("--threads") for arg in container["command"])
    assert {"name": "PYTHONHASHSEED", "value": "0"} in container["env"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["hostPath"]["type"] == "Directory"
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}


def test_workers_run_under_the_restricted_pod_security_standard() -> None:
    pod = deployment(_pool(), 1)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["runAsNonRoot"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    # A read-only root needs somewhere writable: /tmp, where HOME points.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "HOME", "value": "/tmp"} in container["env"]


def test_workers_are_probed_on_healthz_with_room_to_load_the_model() -> None:
    container = deployment(_pool(), 1)["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert container["ports"] == [{"name": "http", "containerPort": 8600, "protocol": "TCP"}]


@pytest.mark.parametrize(
    ("quantity", "cores"), [(2, 2.0), ("1500m", 1.5), ("0.5", 0.5), ("2e0", 2.0), ("x", 1.0)]
)
def test_cpu_quantities_become_cores(quantity: int | str, cores: float) -> None:
    assert cpu_cores(quantity) == cores


def test_only_a_deployment_controlled_by_this_very_pool_is_its_own() -> None:
    pool = _pool()
    assert is_owned(_deployment_status(1, 1), pool)
    earlier = {"metadata": {"ownerReferences": [{"uid": "older-uid", "controller": True}]}}
    assert not is_owned(earlier, pool)
    assert not is_owned({"metadata": {}}, pool)


# --- status ------------------------------------------------------------------------------------


def test_a_pool_with_all_its_workers_ready_is_available_and_scaled() -> None:
    assessment = pool_status(_pool(), 6, _deployment_status(2, 2), [_pod(), _pod()], NOW)
    status = assessment.status
    assert (status.replicas, status.ready_replicas, status.desired_replicas, status.demand) == (
        2,
        2,
        2,
        6,
    )
    assert status.observed_generation == 3
    assert condition_status(status.conditions, "Available") == "True"
    assert condition_status(status.conditions, "Scaled") == "True"
    reasons = {t.reason for t in assessment.transitions}
    assert reasons == {"ScaledUp", "WorkersReady", "DesiredReplicasReady"}


def test_a_pool_is_available_once_a_pod_it_registers_as_a_peer_is_ready() -> None:
    # The Deployment may count a pod ready before the pool loop has seen it so (and registered
    # it as a Ready peer); Available follows the pods the loop saw, a terminating one not.
    ahead = pool_status(_pool(), 1, _deployment_status(1, 1), [_pod(ready=False)], NOW)
    assert condition_status(ahead.status.conditions, "Available") == "False"
    leaving = _pod()
    leaving["metadata"]["deletionTimestamp"] = "2026-03-01T12:00:00Z"
    draining = pool_status(_pool(), 1, _deployment_status(1, 1), [leaving], NOW)
    assert condition_status(draining.status.conditions, "Available") == "False"
    serving = pool_status(_pool(), 1, _deployment_status(1, 1), [_pod(), leaving], NOW)
    available = next(c for c in serving.status.conditions if c.type == "Available")
    assert (available.status, available.message) == ("True", "1 worker ready")


def test_pods_the_scheduler_cannot_place_make_the_pool_unschedulable_with_a_warning() -> None:
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    assessment = pool_status(
        _pool(resources={"gpus": 2}),
        0,
        _deployment_status(1, 0),
        [_pod(scheduled=False, message=message)],
        NOW,
    )
    conditions = {c.type: c for c in assessment.status.conditions}
    assert conditions["Scaled"].status == "False"
    assert conditions["Scaled"].reason == "Unschedulable"
    assert message in conditions["Scaled"].message
    assert conditions["Available"].status == "False"
    assert conditions["Available"].reason == "NoWorkerReady"
    warnings = [t for t in assessment.transitions if t.type == "Warning"]
    assert [t.reason for t in warnings] == ["Unschedulable"]
    assert message in warnings[0].message


def test_a_terminating_pod_that_was_never_placed_does_not_count() -> None:
    pod = _pod(scheduled=False, message="no fit")
    pod["metadata"]["deletionTimestamp"] = NOW.isoformat()
    assessment = pool_status(_pool(), 0, _deployment_status(1, 1), [pod], NOW)
    assert condition_status(assessment.status.conditions, "Scaled") == "True"


def test_a_deployment_that_cannot_create_pods_says_why() -> None:
    failure = {
        "type": "ReplicaFailure",
        "status": "True",
        "reason": "FailedCreate",
        "message": 'pods "qwen-abc" is forbidden: violates PodSecurity "restricted:latest"',
    }
    assessment = pool_status(_pool(), 0, _deployment_status(0, 0, [failure]), [], NOW)
    scaled = next(c for c in assessment.status.conditions if c.type == "Scaled")
    assert (scaled.status, scaled.reason) == ("False", "ReplicaFailure")
    assert "PodSecurity" in scaled.message


def test_more_demand_scales_up_and_less_scales_down_each_with_one_event() -> None:
    pool = _pool(requestsPerReplica=2, maxReplicas=3)
    first = pool_status(pool, 0, _deployment_status(1, 1), [_pod()], NOW)
    pool.status = first.status
    busy = pool_status(pool, 7, _deployment_status(1, 1), [_pod()], NOW + timedelta(seconds=1))
    assert busy.status.desired_replicas == 3
    assert [t.reason for t in busy.transitions] == ["ScaledUp", "WorkersStarting"]
    assert "3 workers for 7 unfinished request(s)" in busy.transitions[0].message
    pool.status = busy.status
    calm = pool_status(pool, 0, _deployment_status(3, 3), [_pod()] * 3, NOW + timedelta(seconds=2))
    assert calm.status.desired_replicas == 1
    assert [t.reason for t in calm.transitions] == ["ScaledDown", "ScalingDown"]


def test_an_unchanged_pool_has_no_transitions_and_keeps_its_transition_times() -> None:
    pool = _pool()
    first = pool_status(pool, 0, _deployment_status(1, 1), [_pod()], NOW)
    pool.status = first.status
    again = pool_status(pool, 0, _deployment_status(1, 1), [_pod()], NOW + timedelta(minutes=5))
    assert again.transitions == []
    assert again.status == first.status


def test_a_pool_scaled_to_zero_is_not_available_and_says_why() -> None:
    assessment = pool_status(_pool(minReplicas=0), 0, _deployment_status(0, 0), [], NOW)
    available = next(c for c in assessment.status.conditions if c.type == "Available")
    assert (available.status, available.reason) == ("False", "ScaledToZero")
    assert condition_status(assessment.status.conditions, "Scaled") == "True"


def test_a_blocked_pool_keeps_its_figures_and_says_why_with_a_warning() -> None:
    pool = _pool()
    pool.status = pool_status(pool, 2, _deployment_status(1, 1), [_pod()], NOW).status
    blocked = blocked_status(pool.status, 4, "DeploymentConflict", "not ours", NOW)
    assert blocked.status.ready_replicas == 1
    assert blocked.status.observed_generation == 4
    scaled = next(c for c in blocked.status.conditions if c.type == "Scaled")
    assert (scaled.status, scaled.reason, scaled.message) == (
        "False",
        "DeploymentConflict",
        "not ours",
    )
    assert [(t.type, t.reason) for t in blocked.transitions] == [("Warning", "DeploymentConflict")]
