"""What to change in a member cluster so that it mirrors exactly this cluster's own peers.

Pure: `plan` compares this cluster's peers with the mirrors a member holds (both as the API
returns them) and says what to create, replace, restatus and delete there. The operator's sync
loop lists both sides, applies the plan, and repeats, so a restart or a lost write heals itself.
"""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from edgellm.api import API_VERSION, ORIGIN_CLUSTER_LABEL

Object = dict[str, Any]


@dataclass
class MirrorPlan:
    create: list[Object] = field(default_factory=list)
    replace: list[Object] = field(default_factory=list)  # spec or labels changed
    restatus: list[Object] = field(default_factory=list)  # status changed
    delete: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.create or self.replace or self.restatus or self.delete)


def mirror_of(peer: Object, origin: str) -> Object:
    """The mirror of one of this cluster's peers: same name, spec and status, origin-labelled."""
    labels = {**peer["metadata"].get("labels", {}), ORIGIN_CLUSTER_LABEL: origin}
    return {
        "apiVersion": API_VERSION,
        "kind": "PeerNode",
        "metadata": {"name": peer["metadata"]["name"], "labels": labels},
        "spec": peer["spec"],
        "status": peer.get("status", {}),
    }


def _heartbeat(status: Object) -> datetime | None:
    value = status.get("lastHeartbeatTime")
    return datetime.fromisoformat(value) if value else None


def _status_differs(desired: Object, current: Object, heartbeat_slack_seconds: float) -> bool:
    """Heartbeats alone are copied only once they drift by the slack: a member needs to know a
    peer is alive, not every beat, and 1,000 peers beating every few seconds would flood it."""
    strip = {"lastHeartbeatTime"}
    if {k: v for k, v in desired.items() if k not in strip} != {
        k: v for k, v in current.items() if k not in strip
    }:
        return True
    new, old = _heartbeat(desired), _heartbeat(current)
    if new is None or old is None:
        return new != old
    return (new - old).total_seconds() > heartbeat_slack_seconds


def plan(
    own_peers: list[Object],
    mirrors: list[Object],
    origin: str,
    heartbeat_slack_seconds: float,
) -> MirrorPlan:
    """`own_peers`: this cluster's peers (spec.cluster == origin); `mirrors`: the member's
    PeerNodes labelled with this origin."""
    result = MirrorPlan()
    current = {m["metadata"]["name"]: m for m in mirrors}
    wanted = {p["metadata"]["name"]: mirror_of(p, origin) for p in own_peers}
    for name, desired in wanted.items():
        existing = current.get(name)
        if existing is None:
            result.create.append(desired)
            continue
        if (
            existing["spec"] != desired["spec"]
            or existing["metadata"].get("labels", {}) != desired["metadata"]["labels"]
        ):
            replacement = {**desired, "metadata": {**desired["metadata"]}}
            replacement["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
            result.replace.append(replacement)
        if _status_differs(desired["status"], existing.get("status", {}), heartbeat_slack_seconds):
            result.restatus.append(desired)
    result.delete = sorted(set(current) - set(wanted))
    return result
