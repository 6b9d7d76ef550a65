"""PeerNodes as tests and benchmarks need them: one builder, its defaults a Ready llama.cpp peer
of `edge-1` that prefills and decodes `tiny-random`, and each caller saying only what differs.

`peer_body` is the object as the API returns it; `peer` the model of it; `candidate` the peer
as the scheduler sees it.
"""

from typing import Any

from edgellm.api import API_VERSION, PeerNode
from edgellm.scheduling import Candidate

Body = dict[str, Any]

NOW = "2026-01-01T00:00:00Z"
READY_REASONS = {True: "HeartbeatFresh", False: "HeartbeatExpired"}


def condition(type_: str, status: bool, reason: str = "", since: str = NOW) -> Body:
    """A status condition as the operator writes it."""
    value = "True" if status else "False"
    return {"type": type_, "status": value, "reason": reason or type_, "lastTransitionTime": since}


def peer_body(
    name: str,
    *,
    ready: bool | None = True,
    metadata: Body | None = None,
    status: Body | None = None,
    **spec: Any,
) -> Body:
    """A PeerNode; `spec` fields (in the API's camelCase) replace the defaults', `metadata` and
    `status` add to them. `ready=None` leaves the Ready condition out (a peer never assessed)."""
    conditions = [] if ready is None else [condition("Ready", ready, READY_REASONS[ready])]
    return {
        "apiVersion": API_VERSION,
        "kind": "PeerNode",
        "metadata": {"name": name, "resourceVersion": "1", **(metadata or {})},
        "spec": {
            "cluster": "edge-1",
            "endpoint": "http://127.0.0.1:8600",
            "roles": ["prefill", "decode"],
            "backends": ["llamacpp"],
            "resources": {"cpu": "4", "memory": "8Gi"},
            "models": [{"name": "tiny-random", "format": "gguf"}],
            **spec,
        },
        "status": {"conditions": conditions, **(status or {})},
    }


def peer(name: str, **fields: Any) -> PeerNode:
    """The model of `peer_body(name, **fields)`."""
    return PeerNode.model_validate(peer_body(name, **fields))


def candidate(
    name: str,
    *,
    local: bool = True,
    warm: bool = False,
    cached: float = 0.0,
    in_flight: int = 0,
    **fields: Any,
) -> Candidate:
    """`peer(name, **fields)` as the scheduler sees it."""
    return Candidate(
        peer(name, **fields),
        local=local,
        session_warm=warm,
        cached_fraction=cached,
        in_flight=in_flight,
    )


def many_peers(count: int, heartbeat: str = NOW, clusters: int = 3) -> list[Body]:
    """`count` peers over `clusters` clusters, as a large federation's status page shows them:
    every tenth unreachable, every seventh not Ready, every eleventh draining, the rest Ready,
    with loads, regions and a `heartbeat` time; nothing listens at their endpoints."""
    bodies = []
    for index in range(count):
        cluster = f"edge-{index % clusters + 1}"
        ready = index % 7 != 3
        body = peer_body(
            f"{cluster}-peer-{index:04d}",
            ready=ready,
            cluster=cluster,
            endpoint=f"http://127.0.0.1:{1024 + index}",
            network={"region": f"region-{index % 5}", "uplinkMbps": 20 + index % 80},
            unschedulable=index % 11 == 5,
            status={
                "lastHeartbeatTime": heartbeat,
                "load": {
                    "runningRequests": index % 4,
                    "queuedRequests": index % 3,
                    "kvCacheUsage": (index % 100) / 100,
                    "tokensPerSecond": float(index % 50),
                },
            },
        )
        conditions = body["status"]["conditions"]
        if index % 10 == 0:
            conditions.append(condition("Reachable", False, "MemberUnreachable"))
        if index % 11 == 5:
            conditions.append(condition("Draining", True, "Unschedulable"))
        bodies.append(body)
    return bodies
