"""A machine joining and leaving the federation as a peer.

`edgellm join` registers this machine's `PeerNode` in one member cluster and heartbeats until it
is stopped; the operators mirror the peer to every other member. `edgellm leave` drains it: no
new requests, the running ones waited for up to a deadline, then the PeerNode is deleted (and
its mirrors withdrawn by the operators).
"""

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from kubernetes import client

from edgellm.api import ORIGIN_CLUSTER_LABEL, PeerLoad, PeerNode, PeerNodeSpec
from edgellm.api.inferencerequest import TERMINAL_PHASES
from edgellm.kube import APIError, ConflictError, NotFoundError, objects

logger = logging.getLogger(__name__)


def register(api: client.ApiClient, name: str, spec: PeerNodeSpec) -> None:
    """Creates this machine's PeerNode, or brings an existing one to `spec`."""
    peer = PeerNode.model_validate(
        {"metadata": {"name": name, "labels": {ORIGIN_CLUSTER_LABEL: spec.cluster}}, "spec": spec}
    ).to_wire()
    del peer["status"]
    try:
        objects.create(api, objects.PEER_NODES, peer)
    except ConflictError:
        objects.patch(api, objects.PEER_NODES, name, {"spec": peer["spec"]})


def heartbeat(api: client.ApiClient, name: str, load: PeerLoad) -> None:
    status = {"lastHeartbeatTime": datetime.now(UTC).isoformat(), "load": load.to_wire()}
    objects.patch_status(api, objects.PEER_NODES, name, status)


def worker_load(endpoint: str) -> PeerLoad:
    """The load the peer's worker reports on /healthz; none when it does not answer."""
    try:
        response = httpx.get(f"{endpoint.rstrip('/')}/healthz", timeout=2.0)
        return PeerLoad.model_validate(response.json().get("load", {}))
    except (httpx.HTTPError, ValueError) as e:
        logger.info("no load from the worker at %s: %s", endpoint, e)
        return PeerLoad()


def heartbeat_until(
    api: client.ApiClient, name: str, endpoint: str, interval: float, stop: threading.Event
) -> None:
    """Heartbeats every `interval` seconds, with the worker's load, until `stop` is set; a
    failed beat is retried."""
    while not stop.is_set():
        try:
            heartbeat(api, name, worker_load(endpoint))
        except (APIError, OSError) as e:
            logger.warning("heartbeat failed, retrying: %s", e)
        stop.wait(interval)


def in_flight_requests(api: client.ApiClient, name: str) -> list[str]:
    """`namespace/name` of every unfinished InferenceRequest assigned to the peer."""
    requests = objects.list_objects(api, objects.INFERENCE_REQUESTS)
    return sorted(
        f"{r['metadata']['namespace']}/{r['metadata']['name']}"
        for r in requests
        if _assigned_to(r, name) and r.get("status", {}).get("phase") not in TERMINAL_PHASES
    )


def _assigned_to(request: dict[str, Any], name: str) -> bool:
    assignment = request.get("status", {}).get("assignment", {})
    return name in (assignment.get("prefillPeer"), assignment.get("decodePeer"))


@dataclass(frozen=True)
class Departure:
    waited_seconds: float
    abandoned: list[str]  # requests still running at the deadline


def leave(
    api: client.ApiClient, name: str, deadline_seconds: float, poll: float = 1.0
) -> Departure:
    """Drains the peer, waits for its requests up to the deadline, and deletes it."""
    objects.patch(api, objects.PEER_NODES, name, {"spec": {"unschedulable": True}})
    started = time.monotonic()
    while (
        running := in_flight_requests(api, name)
    ) and time.monotonic() - started < deadline_seconds:
        logger.info("waiting for %d request(s) on %s: %s", len(running), name, ", ".join(running))
        time.sleep(poll)
    with contextlib.suppress(NotFoundError):
        objects.delete(api, objects.PEER_NODES, name)
    return Departure(time.monotonic() - started, running)
