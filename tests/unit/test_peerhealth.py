"""A peer's conditions, Events and removal follow from its heartbeat and spec alone."""

from datetime import UTC, datetime, timedelta
from typing import Any

from edgellm.api import PeerNode
from edgellm.operator.peerhealth import assess
from tests.builders import peer

CREATED = datetime(2026, 1, 1, tzinfo=UTC)
GRACE = timedelta(seconds=60)


def _peer(heartbeat: datetime | None = None, **spec: Any) -> PeerNode:
    return peer(
        "p",
        ready=None,
        metadata={"generation": 3},
        status={"lastHeartbeatTime": heartbeat.isoformat()} if heartbeat else {},
        roles=["decode"],
        resources={"cpu": 1, "memory": "1Gi"},
        heartbeatTTLSeconds=30,
        **spec,
    )


def _by_type(peer: PeerNode, now: datetime) -> dict[str, tuple[str, str]]:
    verdict = assess(peer, now, CREATED, GRACE)
    return {c.type: (c.status, c.reason) for c in verdict.conditions}


def test_a_fresh_heartbeat_makes_the_peer_ready() -> None:
    now = CREATED + timedelta(minutes=5)
    conditions = _by_type(_peer(now - timedelta(seconds=10)), now)
    assert conditions["Ready"] == ("True", "HeartbeatFresh")
    assert conditions["Draining"] == ("False", "Schedulable")


def test_a_peer_without_heartbeat_past_its_ttl_goes_not_ready_with_a_warning() -> None:
    now = CREATED + timedelta(minutes=5)
    verdict = assess(_peer(now - timedelta(seconds=31)), now, CREATED, GRACE)
    ready = next(c for c in verdict.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("False", "HeartbeatExpired")
    assert ready.observed_generation == 3
    assert any(t.type == "Warning" and t.reason == "HeartbeatExpired" for t in verdict.transitions)
    assert not verdict.remove


def test_a_new_peer_awaits_its_first_heartbeat_then_expires() -> None:
    assert _by_type(_peer(), CREATED + timedelta(seconds=5))["Ready"] == (
        "False",
        "AwaitingHeartbeat",
    )
    assert _by_type(_peer(), CREATED + timedelta(seconds=31))["Ready"][1] == "HeartbeatExpired"


def test_a_peer_silent_beyond_ttl_and_grace_is_removed() -> None:
    now = CREATED + timedelta(minutes=5)
    verdict = assess(_peer(now - timedelta(seconds=91)), now, CREATED, GRACE)
    assert verdict.remove
    assert verdict.transitions[-1].reason == "PeerRemoved"


def test_an_unchanged_condition_keeps_its_transition_time_and_posts_no_event() -> None:
    now = CREATED + timedelta(minutes=5)
    first = assess(_peer(now), now, CREATED, GRACE)
    peer = _peer(now)
    peer.status.conditions = first.conditions
    later = now + timedelta(seconds=5)
    second = assess(peer, later, CREATED, GRACE)
    assert second.transitions == []
    ready = next(c for c in second.conditions if c.type == "Ready")
    assert ready.last_transition_time == now


def test_an_unschedulable_peer_is_draining() -> None:
    now = CREATED + timedelta(minutes=5)
    assert _by_type(_peer(now, unschedulable=True), now)["Draining"] == ("True", "Unschedulable")
