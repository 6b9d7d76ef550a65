"""Which of several operator replicas works: kopf's peering, extended to the operator's own loops.

With `edgellm operator --peering NAME`, every replica keeps a record alive in the status of the
ClusterKopfPeering NAME, and kopf pauses its handlers (watches, request daemons, node timers) in
every replica but the one whose live record has the single highest priority. The peer-health,
federation and worker-pool loops are not kopf handlers, so kopf would leave them running
everywhere: `Leadership` reads the same object by the same rule and runs them only in the replica
kopf lets work. `app.py` starts it; `leader` and `seniority` are the plain decisions.
"""

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client

from edgellm.kube import NotFoundError, objects
from edgellm.kube.objects import Resource

logger = logging.getLogger(__name__)

# kopf's own kind, not EdgeLLM's: its CRD is charts/edgellm/crds/clusterkopfpeerings.kopf.dev.yaml.
PEERINGS = Resource("kopf.dev", "v1", "clusterkopfpeerings", namespaced=False)
# What kopf assumes of a record that states no lifetime.
DEFAULT_LIFETIME_SECONDS = 60
# Below one second apart, the order of two replicas' start is left to chance (see `seniority`).
_TIE_BREAK_BITS = 20


@dataclass(frozen=True)
class Replica:
    """This operator process in its peering: the ClusterKopfPeering's name, the key of its
    record there and its priority."""

    peering: str
    identity: str
    priority: int

    @classmethod
    def of_this_process(cls, peering: str) -> "Replica":
        # In a pod the host name is the pod's name: `kubectl get clusterkopfpeering` tells who.
        identity = f"{socket.gethostname()}/{os.getpid()}"
        return cls(peering, identity, seniority(time.time()))


def seniority(started: float) -> int:
    """A priority higher the earlier the process started (Unix time): a replica that restarts
    or is added stands by rather than taking over from one that works. Random low bits order
    replicas started within the same second, since kopf freezes every replica of a shared
    highest priority; the value stays within the integers JSON numbers hold exactly."""
    return -(int(started) << _TIE_BREAK_BITS) + random.randrange(1 << _TIE_BREAK_BITS)


def leader(records: Mapping[str, Any], now: datetime) -> str | None:
    """The identity kopf lets work, from a ClusterKopfPeering's status (identity -> priority,
    lifetime, lastseen): the live record of highest priority, or None when there is no live
    record or the highest priority is shared (kopf then freezes all of them)."""
    live = {
        identity: int(record.get("priority", 0))
        for identity, record in records.items()
        if _alive(record, now)
    }
    if not live:
        return None
    highest = max(live.values())
    leaders = [identity for identity, priority in live.items() if priority == highest]
    return leaders[0] if len(leaders) == 1 else None


def _alive(record: Mapping[str, Any], now: datetime) -> bool:
    lastseen = record.get("lastseen")
    if lastseen is None:  # kopf counts such a record as seen just now
        return True
    lifetime = timedelta(seconds=int(record.get("lifetime", DEFAULT_LIFETIME_SECONDS)))
    return datetime.fromisoformat(lastseen) + lifetime > now


class Leadership:
    """Reads the peering every `interval` seconds and awaits `lead(True)` when this replica
    becomes the one that works, `lead(False)` when it stops being it (and at the first reading
    when it is not)."""

    def __init__(
        self,
        *,
        local: client.ApiClient,
        replica: Replica,
        interval: float,
        lead: Callable[[bool], Awaitable[None]],
    ) -> None:
        self.local = local
        self.replica = replica
        self.interval = interval
        self.lead = lead
        self.leading: bool | None = None  # None until the peering has been read
        self._trouble: str | None = None  # what went wrong at the last reading, if anything
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="leadership")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval)

    async def check(self) -> None:
        peering = self.replica.peering
        try:
            records = await asyncio.to_thread(self._records)
        except Exception as e:  # unknown, not lost: the records' lifetimes settle it
            self._warn("unreadable", f"reading the ClusterKopfPeering {peering} failed: {e}")
            return
        if records is None:
            self._warn(
                "missing",
                f"the ClusterKopfPeering {peering} does not exist (kopf waits for it too):"
                " create it, as the Helm chart does",
            )
            working = None
        else:
            self._trouble = None
            working = leader(records, datetime.now(UTC))
        leading = working == self.replica.identity
        if leading == self.leading:
            return
        try:
            await self.lead(leading)
        except Exception:  # e.g. the first listing of peers failed: tried again next time
            logger.exception("%s of the peering %s failed", _role(leading), peering)
            return
        self.leading = leading
        logger.info(
            "%s in the peering %s as %s (%s works)",
            _role(leading),
            peering,
            self.replica.identity,
            working or "no single replica",
        )

    def _warn(self, trouble: str, message: str) -> None:
        """Logs `message` when `trouble` begins, not at every reading while it lasts."""
        if trouble != self._trouble:
            logger.warning(message)
        self._trouble = trouble

    def _records(self) -> dict[str, Any] | None:
        try:
            body = objects.get(self.local, PEERINGS, self.replica.peering)
        except NotFoundError:
            return None
        return dict(body.get("status") or {})


def _role(leading: bool) -> str:
    return "leading" if leading else "standing by"
