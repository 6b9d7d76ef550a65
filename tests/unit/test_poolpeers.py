"""Worker pods of a WorkerPool as peers: the PeerNode each stands for, drained while it is being
deleted, and the peers whose pods are gone."""

from typing import Any

from edgellm.api import PeerNode, WorkerPool
from edgellm.operator.poolpeers import POD_LABEL, orphaned_peers, peer_for_pod, peer_name
from edgellm.operator.workerpools import pod_ready

POOL = WorkerPool.model_validate(
    {
        "metadata": {"name": "tiny", "namespace": "team-a", "uid": "pool-uid"},
        "spec": {
            "model": "tiny-random",
            "source": {"generated": "tiny-random"},
            "resources": {"cpu": "500m", "memory": "512Mi"},
        },
    }
)


def _pod(ip: str | None = "10.244.1.7", ready: bool = True, deleting: bool = False) -> Any:
    metadata: dict[str, Any] = {"name": "tiny-5d8f-x2k", "namespace": "team-a"}
    if deleting:
        metadata["deletionTimestamp"] = "2026-12-06T10:00:00Z"
    status: dict[str, Any] = {
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]
    }
    if ip:
        status["podIP"] = ip
    return {"metadata": metadata, "spec": {"nodeName": "node-0"}, "status": status}


def test_a_worker_pod_is_a_peer_at_its_address_serving_the_pool_s_model() -> None:
    body = peer_for_pod(_pod(), POOL, "home-a", {})
    assert body is not None
    peer = PeerNode.model_validate(body)  # what the CRD would accept
    assert peer.metadata.name == "home-a-team-a-tiny-5d8f-x2k"
    assert peer.spec.cluster == "home-a"
    assert peer.spec.endpoint == "http://10.244.1.7:8600"
    assert peer.spec.roles == ["prefill", "decode"]
    assert peer.spec.backends == ["llamacpp"]
    assert (peer.spec.resources.cpu, peer.spec.resources.memory) == ("500m", "512Mi")
    assert peer.spec.resources.accelerators == []
    assert [(m.name, m.format) for m in peer.spec.models] == [("tiny-random", "gguf")]
    assert peer.spec.unschedulable is False
    labels = body["metadata"]["labels"]
    assert labels["edgellm.io/origin-cluster"] == "home-a"
    assert labels["edgellm.io/worker-pool"] == "tiny"
    assert (labels[POD_LABEL], labels["edgellm.io/pod-namespace"]) == ("tiny-5d8f-x2k", "team-a")


def test_a_pod_without_an_address_yet_is_no_peer() -> None:
    assert peer_for_pod(_pod(ip=None), POOL, "home-a", {}) is None


def test_a_pod_being_deleted_takes_no_new_requests() -> None:
    body = peer_for_pod(_pod(deleting=True), POOL, "home-a", {})
    assert body is not None
    assert body["spec"]["unschedulable"] is True


def test_a_gpu_worker_s_accelerators_come_from_its_node_s_labels() -> None:
    pool = POOL.model_copy(deep=True)
    pool.spec.role = "decode"
    pool.spec.resources.gpus = 2
    labels = {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-3090", "nvidia.com/gpu.memory": "24576"}
    body = peer_for_pod(_pod(), pool, "home-a", labels)
    assert body is not None
    peer = PeerNode.model_validate(body)
    assert peer.spec.roles == ["decode"]
    (gpu,) = peer.spec.resources.accelerators
    assert (gpu.vendor, gpu.model, gpu.memory, gpu.count) == (
        "nvidia",
        "NVIDIA-GeForce-RTX-3090",
        "24576Mi",
        2,
    )


def test_readiness_is_the_pod_s_ready_condition() -> None:
    assert pod_ready(_pod())
    assert not pod_ready(_pod(ready=False))
    assert not pod_ready({"metadata": {}, "status": {}})


def test_peers_of_pods_that_are_gone_are_orphans_and_no_others() -> None:
    def peer(name: str, cluster: str, pod: str | None) -> dict[str, Any]:
        labels = {} if pod is None else {POD_LABEL: pod, "edgellm.io/pod-namespace": "team-a"}
        return {"metadata": {"name": name, "labels": labels}, "spec": {"cluster": cluster}}

    peers = [
        peer("alive", "home-a", "tiny-1"),
        peer("gone", "home-a", "tiny-2"),
        peer("joined-machine", "home-a", None),  # `edgellm join`, not a pod
        peer("mirror", "home-b", "tiny-9"),  # home-b's own pool: home-b removes it
    ]
    assert orphaned_peers(peers, "home-a", {("team-a", "tiny-1")}) == ["gone"]


def test_peer_names_are_unique_per_cluster_namespace_and_pod_and_valid() -> None:
    assert peer_name("home-a", "team-a", "tiny-1") != peer_name("home-b", "team-a", "tiny-1")
    assert peer_name("home-a", "team-a", "tiny-1") != peer_name("home-a", "team-b", "tiny-1")
    assert len(peer_name("c" * 63, "n" * 63, "p" * 253)) <= 253
