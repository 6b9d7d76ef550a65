"""A labelled Kubernetes Node becomes a valid PeerNode owned by the Node."""

from datetime import UTC, datetime
from typing import Any

from edgellm.api import PeerNode
from edgellm.operator.nodepeers import node_heartbeat, peer_for_node, peer_name

GPU_NODE: dict[str, Any] = {
    "metadata": {
        "name": "garage",
        "uid": "1234",
        "labels": {
            "nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-3090",
            "nvidia.com/gpu.memory": "24576",
        },
        "annotations": {"edgellm.io/roles": "decode", "edgellm.io/models": "tiny-random, llama-8b"},
    },
    "status": {
        "allocatable": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "2"},
        "addresses": [{"type": "InternalIP", "address": "10.0.0.7"}],
        "conditions": [
            {"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-01-01T00:00:00Z"}
        ],
    },
}


def test_a_gpu_node_becomes_a_vllm_capable_peer_owned_by_the_node() -> None:
    manifest = peer_for_node(GPU_NODE, "edge-1")
    peer = PeerNode.model_validate(manifest)
    assert peer.metadata.name == "edge-1-garage"
    assert peer.spec.endpoint == "http://10.0.0.7:8600"
    assert peer.spec.roles == ["decode"]
    assert peer.spec.backends == ["llamacpp", "vllm"]
    assert [m.name for m in peer.spec.models] == ["tiny-random", "llama-8b"]
    gpu = peer.spec.resources.accelerators[0]
    assert (gpu.model, gpu.memory, gpu.count) == ("NVIDIA-GeForce-RTX-3090", "24576Mi", 2)
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "1234"


def test_a_node_already_named_after_its_cluster_keeps_its_name() -> None:
    assert peer_name("edge-1", "edge-1-cpu-0") == "edge-1-cpu-0"
    assert peer_name("edge-1", "cpu-0") == "edge-1-cpu-0"


def test_the_lease_is_the_heartbeat_and_the_ready_condition_the_fallback() -> None:
    renewed = datetime(2026, 1, 2, tzinfo=UTC)
    assert node_heartbeat(GPU_NODE, renewed) == renewed.isoformat()
    assert node_heartbeat(GPU_NODE, None) == "2026-01-01T00:00:00Z"
