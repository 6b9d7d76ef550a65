"""A Kubernetes Node labelled `edgellm.io/peer=true` kept as a PeerNode, with its heartbeat.

The kopf timer of every labelled Node (`app.py`) calls `sync_node` in a worker thread: the peer
that `nodepeers.peer_for_node` describes is created, or its spec brought up to date, and the
Node's lease renewal becomes the peer's heartbeat.
"""

import contextlib
from datetime import datetime
from typing import Any

from kubernetes import client

from edgellm.kube import APIError, NotFoundError, objects, translated
from edgellm.operator import nodepeers


def sync_node(local: client.ApiClient, node: dict[str, Any], cluster: str) -> None:
    """Creates or updates the PeerNode of a labelled Node and copies its heartbeat."""
    desired = nodepeers.peer_for_node(node, cluster)
    name = desired["metadata"]["name"]
    try:
        current = objects.get(local, objects.PEER_NODES, name)
    except NotFoundError:
        objects.create(local, objects.PEER_NODES, desired)
    else:
        if current["spec"] != {**current["spec"], **desired["spec"]}:
            objects.patch(local, objects.PEER_NODES, name, {"spec": desired["spec"]})
    renewed: datetime | None = None
    with contextlib.suppress(APIError), translated():
        lease = client.CoordinationV1Api(local).read_namespaced_lease(
            node["metadata"]["name"], "kube-node-lease"
        )
        renewed = lease.spec.renew_time
    heartbeat = nodepeers.node_heartbeat(node, renewed)
    if heartbeat:
        objects.patch_status(local, objects.PEER_NODES, name, {"lastHeartbeatTime": heartbeat})
