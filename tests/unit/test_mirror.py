"""The mirror plan makes a member hold exactly this cluster's peers, and writes only changes."""

from typing import Any

from edgellm.federation.mirror import mirror_of, plan
from tests.builders import peer_body


def _peer(name: str, cpu: int = 1, heartbeat: str = "2026-01-01T00:00:00+00:00") -> dict[str, Any]:
    return peer_body(
        name,
        metadata={"labels": {"team": "a"}},
        status={"lastHeartbeatTime": heartbeat},
        resources={"cpu": cpu, "memory": "1Gi"},
    )


def _remote(peer: dict[str, Any]) -> dict[str, Any]:
    mirror = mirror_of(peer, "edge-1")
    mirror["metadata"]["resourceVersion"] = "77"
    return mirror


def test_missing_mirrors_are_created_and_strays_deleted() -> None:
    result = plan([_peer("a")], [_remote(_peer("gone"))], "edge-1", heartbeat_slack_seconds=10)
    assert [m["metadata"]["name"] for m in result.create] == ["a"]
    assert result.create[0]["metadata"]["labels"] == {
        "team": "a",
        "edgellm.io/origin-cluster": "edge-1",
    }
    assert result.delete == ["gone"]


def test_an_identical_mirror_needs_nothing() -> None:
    assert plan([_peer("a")], [_remote(_peer("a"))], "edge-1", 10).is_empty()


def test_a_changed_spec_is_replaced_at_the_mirrors_resource_version() -> None:
    result = plan([_peer("a", cpu=4)], [_remote(_peer("a"))], "edge-1", 10)
    assert result.replace[0]["metadata"]["resourceVersion"] == "77"
    assert result.replace[0]["spec"]["resources"] == {"cpu": 4, "memory": "1Gi"}


def test_heartbeats_are_copied_only_once_they_drift_by_the_slack() -> None:
    mirrored = _remote(_peer("a", heartbeat="2026-01-01T00:00:00+00:00"))
    close = plan([_peer("a", heartbeat="2026-01-01T00:00:05+00:00")], [mirrored], "edge-1", 10)
    far = plan([_peer("a", heartbeat="2026-01-01T00:00:15+00:00")], [mirrored], "edge-1", 10)
    assert close.is_empty()
    assert [m["metadata"]["name"] for m in far.restatus] == ["a"]


def test_a_changed_condition_is_copied_at_once() -> None:
    local = _peer("a")
    local["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    result = plan([local], [_remote(_peer("a"))], "edge-1", 10)
    assert result.restatus[0]["status"]["conditions"] == [{"type": "Ready", "status": "False"}]
