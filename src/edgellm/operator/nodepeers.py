"""The PeerNode that stands for a Kubernetes Node labelled `edgellm.io/peer=true`.

Pure: the operator's node timer calls `peer_for_node` and applies the result. Resources come from
the Node's allocatable and NVIDIA's GPU feature-discovery labels; annotations override what a
Node cannot say (endpoint, roles, models). The owner reference lets the garbage collector remove
the peer with its Node.
"""

from datetime import datetime
from typing import Any

from edgellm.api import API_VERSION, ORIGIN_CLUSTER_LABEL

ENDPOINT_ANNOTATION = "edgellm.io/endpoint"
ROLES_ANNOTATION = "edgellm.io/roles"
MODELS_ANNOTATION = "edgellm.io/models"
WORKER_PORT = 8600


def peer_name(cluster: str, node: str) -> str:
    """Peer names are unique across the federation, Node names only within their cluster."""
    return node if node.startswith(f"{cluster}-") else f"{cluster}-{node}"


def _csv(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _address(node: dict[str, Any]) -> str:
    addresses = node.get("status", {}).get("addresses") or []
    internal = [a["address"] for a in addresses if a.get("type") == "InternalIP"]
    return str(internal[0] if internal else node["metadata"]["name"])


def gpu_accelerators(labels: dict[str, str], count: int) -> list[dict[str, Any]]:
    """`count` NVIDIA GPUs as a peer's accelerators, described by the labels NVIDIA's GPU
    feature discovery puts on their Node."""
    if not count:
        return []
    return [
        {
            "vendor": "nvidia",
            "model": labels.get("nvidia.com/gpu.product", "NVIDIA-GPU"),
            "memory": f"{labels.get('nvidia.com/gpu.memory', '0')}Mi",
            "count": count,
        }
    ]


def peer_for_node(node: dict[str, Any], cluster: str) -> dict[str, Any]:
    metadata = node["metadata"]
    labels = metadata.get("labels", {})
    annotations = metadata.get("annotations", {})
    allocatable = node.get("status", {}).get("allocatable", {})
    gpus = int(allocatable.get("nvidia.com/gpu", "0"))
    accelerators = gpu_accelerators(labels, gpus)
    endpoint = annotations.get(ENDPOINT_ANNOTATION) or f"http://{_address(node)}:{WORKER_PORT}"
    return {
        "apiVersion": API_VERSION,
        "kind": "PeerNode",
        "metadata": {
            "name": peer_name(cluster, metadata["name"]),
            "labels": {ORIGIN_CLUSTER_LABEL: cluster, "edgellm.io/node": metadata["name"]},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "name": metadata["name"],
                    "uid": metadata["uid"],
                }
            ],
        },
        "spec": {
            "cluster": cluster,
            "endpoint": endpoint,
            "roles": _csv(annotations.get(ROLES_ANNOTATION)) or ["prefill", "decode"],
            "backends": ["llamacpp", "vllm"] if gpus else ["llamacpp"],
            "resources": {
                "cpu": allocatable.get("cpu", "0"),
                "memory": allocatable.get("memory", "0"),
                "accelerators": accelerators,
            },
            "models": [{"name": name} for name in _csv(annotations.get(MODELS_ANNOTATION))],
        },
    }


def node_heartbeat(node: dict[str, Any], lease_renewed: datetime | None) -> str | None:
    """When the Node's kubelet (or KWOK) last reported: its Lease, else its Ready condition."""
    if lease_renewed is not None:
        return lease_renewed.isoformat()
    for condition in node.get("status", {}).get("conditions") or []:
        if condition.get("type") == "Ready" and condition.get("status") == "True":
            heartbeat: str | None = condition.get("lastHeartbeatTime")
            return heartbeat
    return None
