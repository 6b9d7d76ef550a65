"""Whether a peer of this cluster is Ready, Draining, or gone, from its heartbeat and spec.

Pure: the operator's health loop calls `assess` for every peer this cluster owns and writes
what it returns (conditions, Events for transitions, removal). Mirrors of other clusters' peers
are assessed by their own cluster and only copied here.
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from edgellm.api import Condition, PeerNode, set_condition

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class Transition:
    """A change a user would want to see in `kubectl describe peer`."""

    type: EventType
    reason: str
    message: str


@dataclass(frozen=True)
class Assessment:
    conditions: list[Condition]
    transitions: list[Transition] = field(default_factory=list)
    remove: bool = False


def heartbeat_age(peer: PeerNode, now: datetime, created: datetime) -> timedelta:
    """Time since the last heartbeat, or since creation for a peer that never reported."""
    return now - (peer.status.last_heartbeat_time or created)


def assess(
    peer: PeerNode, now: datetime, created: datetime, removal_grace: timedelta
) -> Assessment:
    ttl = timedelta(seconds=peer.spec.heartbeat_ttl_seconds)
    age = heartbeat_age(peer, now, created)
    generation = peer.metadata.generation
    conditions = list(peer.status.conditions)
    transitions: list[Transition] = []

    def update(type_: str, status: Literal["True", "False"], reason: str, message: str) -> None:
        nonlocal conditions
        conditions, changed = set_condition(
            conditions, type_, status, reason, message, now, generation
        )
        if changed:
            bad = type_ in ("Ready", "Reachable") and status == "False"
            event_type: EventType = "Warning" if bad else "Normal"
            transitions.append(Transition(event_type, reason, f"{type_}={status}: {message}"))

    if peer.status.last_heartbeat_time is None and age <= ttl:
        update("Ready", "False", "AwaitingHeartbeat", "the peer has not reported in yet")
    elif age <= ttl:
        update("Ready", "True", "HeartbeatFresh", f"last heartbeat {age.total_seconds():.0f}s ago")
    else:
        update(
            "Ready",
            "False",
            "HeartbeatExpired",
            f"no heartbeat for {age.total_seconds():.0f}s (TTL {ttl.total_seconds():.0f}s)",
        )
    update("Reachable", "True", "LocalPeer", "the peer belongs to this cluster")
    if peer.spec.unschedulable:
        update("Draining", "True", "Unschedulable", "the peer takes no new requests")
    else:
        update("Draining", "False", "Schedulable", "the peer takes new requests")

    remove = age > ttl + removal_grace
    if remove:
        transitions.append(
            Transition(
                "Warning",
                "PeerRemoved",
                f"no heartbeat for {age.total_seconds():.0f}s: removing the peer",
            )
        )
    return Assessment(conditions, transitions, remove)
