"""The PeerNode of each worker pod a WorkerPool runs: pool workers are peers like any other.

Pure: the operator's pool loop (`poolreconciler.py`) calls `peer_for_pod` for every pod of a
pool, applies the result, heartbeats it while the pod is Ready, and deletes the peers that
`orphaned_peers` names. The operator registers these peers on the pods' behalf, as it does for
labelled Nodes (`nodepeers.py`): a worker pod then needs no Kubernetes credentials (it mounts no
ServiceAccount token), and PeerNodes, which are cluster-scoped, need no per-namespace grants.

A pod being deleted is drained at once (spec.unschedulable: no new requests); the worker itself,
told to stop, finishes what it runs before it exits (`edgellm worker --drain-timeout`). Once the
pod is gone its peer is deleted; a cluster-scoped PeerNode cannot be owned by a namespaced pod,
so this is the operator's job rather than the garbage collector's.
"""

from collections.abc import Iterable
from typing import Any

from edgellm.api import API_VERSION, ORIGIN_CLUSTER_LABEL, WorkerPool
from edgellm.operator.nodepeers import WORKER_PORT, gpu_accelerators
from edgellm.operator.workerpools import POOL_LABEL, pod_terminating

Body = dict[str, Any]

POD_LABEL = "edgellm.io/pod"
POD_NAMESPACE_LABEL = "edgellm.io/pod-namespace"
# KWOK's simulated nodes carry it: their pods have addresses, but nothing runs behind them.
SIMULATED_NODE_ANNOTATION = "kwok.x-k8s.io/node"


def peer_name(cluster: str, namespace: str, pod: str) -> str:
    """Unique in the federation: a pod's name is unique only in its namespace and cluster."""
    return f"{cluster}-{namespace}-{pod}"[:253].rstrip("-.")


def peer_for_pod(
    pod: Body, pool: WorkerPool, cluster: str, node_labels: dict[str, str]
) -> Body | None:
    """The PeerNode standing for one worker pod; None until the pod has an address."""
    address = (pod.get("status") or {}).get("podIP")
    if not address:
        return None
    spec = pool.spec
    metadata = pod["metadata"]
    accelerators = gpu_accelerators(node_labels, spec.resources.gpus)
    return {
        "apiVersion": API_VERSION,
        "kind": "PeerNode",
        "metadata": {
            "name": peer_name(cluster, metadata["namespace"], metadata["name"]),
            "labels": {
                ORIGIN_CLUSTER_LABEL: cluster,
                POOL_LABEL: pool.metadata.name,
                POD_LABEL: metadata["name"],
                POD_NAMESPACE_LABEL: metadata["namespace"],
            },
        },
        "spec": {
            "cluster": cluster,
            "endpoint": f"http://{address}:{WORKER_PORT}",
            "roles": ["prefill", "decode"] if spec.role == "both" else [spec.role],
            "backends": [spec.backend],
            "resources": {
                "cpu": spec.resources.cpu,
                "memory": spec.resources.memory,
                "accelerators": accelerators,
            },
            "models": [
                {"name": spec.model, "format": "safetensors" if spec.backend == "vllm" else "gguf"}
            ],
            "unschedulable": pod_terminating(pod),
        },
    }


def orphaned_peers(peers: Iterable[Body], cluster: str, pods: set[tuple[str, str]]) -> list[str]:
    """This cluster's pool peers whose pod, (namespace, name), no longer exists."""
    orphans = []
    for peer in peers:
        labels = peer["metadata"].get("labels") or {}
        if peer["spec"].get("cluster") != cluster or POD_LABEL not in labels:
            continue
        if (labels.get(POD_NAMESPACE_LABEL, ""), labels[POD_LABEL]) not in pods:
            orphans.append(peer["metadata"]["name"])
    return orphans
