"""Which replica of a peering works follows kopf's rule on the ClusterKopfPeering's records, and
the operator's own loops start and stop with it."""

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client
from pydantic import ValidationError

from edgellm.operator.leadership import Leadership, Replica, leader, seniority
from edgellm.operator.settings import OperatorSettings

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
ME = Replica("ha", "pod-a/1", 10)


def _record(priority: int, seen_ago: float = 1.0, lifetime: int = 15) -> dict[str, Any]:
    lastseen = (NOW - timedelta(seconds=seen_ago)).isoformat()
    return {"priority": priority, "lifetime": lifetime, "lastseen": lastseen}


# --- who works ---------------------------------------------------------------------------------


def test_the_live_record_of_highest_priority_works() -> None:
    records = {"pod-a/1": _record(10), "pod-b/1": _record(5)}
    assert leader(records, NOW) == "pod-a/1"


def test_an_expired_record_counts_for_nothing() -> None:
    records = {"pod-a/1": _record(10, seen_ago=16), "pod-b/1": _record(5)}
    assert leader(records, NOW) == "pod-b/1"


def test_a_shared_highest_priority_leaves_nobody_working_as_kopf_freezes_them_all() -> None:
    records = {"pod-a/1": _record(10), "pod-b/1": _record(10), "pod-c/1": _record(1)}
    assert leader(records, NOW) is None


def test_no_live_record_leaves_nobody_working() -> None:
    assert leader({}, NOW) is None
    assert leader({"pod-a/1": _record(10, seen_ago=15)}, NOW) is None


def test_a_record_without_lifetime_or_lastseen_gets_kopfs_defaults() -> None:
    # kopf assumes 60 seconds of lifetime, and a record never seen as seen just now.
    assert leader({"pod-a/1": {"priority": 1, "lastseen": _record(0, 59)["lastseen"]}}, NOW)
    assert not leader({"pod-a/1": {"priority": 1, "lastseen": _record(0, 61)["lastseen"]}}, NOW)
    assert leader({"pod-a/1": {"priority": 1}}, NOW) == "pod-a/1"


def test_the_replica_started_first_has_the_higher_priority() -> None:
    started = NOW.timestamp()
    for _ in range(100):  # whatever the random low bits
        assert seniority(started) > seniority(started + 1)
    # JSON numbers (the peering's status) hold it exactly.
    assert abs(seniority(started)) < 2**53


# --- starting and stopping the loops ---------------------------------------------------------


class _Peering(Leadership):
    """A Leadership reading records handed to it instead of the cluster's."""

    def __init__(self) -> None:
        super().__init__(local=client.ApiClient(), replica=ME, interval=1.0, lead=self._lead)
        self.records: dict[str, Any] | Exception | None = None
        self.calls: list[bool] = []
        self.failing = False

    async def _lead(self, leading: bool) -> None:
        self.calls.append(leading)
        if self.failing:
            raise RuntimeError("the peers cannot be listed")

    def _records(self) -> dict[str, Any] | None:
        if isinstance(self.records, Exception):
            raise self.records
        return self.records


def _fresh(priority: int) -> dict[str, Any]:
    return {"priority": priority, "lifetime": 15, "lastseen": datetime.now(UTC).isoformat()}


def test_loops_start_when_the_replica_leads_and_stop_when_another_does() -> None:
    peering = _Peering()
    peering.records = {ME.identity: _fresh(10), "pod-b/1": _fresh(5)}
    asyncio.run(peering.check())
    asyncio.run(peering.check())  # no change: no call
    peering.records = {ME.identity: _fresh(10), "pod-b/1": _fresh(20)}
    asyncio.run(peering.check())
    assert peering.calls == [True, False]
    assert peering.leading is False


def test_a_standby_stops_its_loops_at_the_first_reading() -> None:
    # Whatever ran before (nothing, at start) is stopped, and the state is known at once.
    peering = _Peering()
    peering.records = {ME.identity: _fresh(10), "pod-b/1": _fresh(20)}
    asyncio.run(peering.check())
    assert peering.calls == [False]


def test_a_missing_peering_object_means_standing_by() -> None:
    peering = _Peering()
    peering.records = {ME.identity: _fresh(10)}
    asyncio.run(peering.check())
    peering.records = None
    asyncio.run(peering.check())
    assert peering.calls == [True, False]


def test_a_missing_peering_object_is_reported_once_while_it_lasts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    peering = _Peering()
    for records in (None, None, {ME.identity: _fresh(10)}, None):
        peering.records = records
        asyncio.run(peering.check())
    assert [r.getMessage() for r in caplog.records].count(
        "the ClusterKopfPeering ha does not exist (kopf waits for it too): create it, as the"
        " Helm chart does"
    ) == 2


def test_a_failed_reading_changes_nothing() -> None:
    peering = _Peering()
    peering.records = {ME.identity: _fresh(10)}
    asyncio.run(peering.check())
    peering.records = client.ApiException(status=500)
    asyncio.run(peering.check())
    assert peering.calls == [True]
    assert peering.leading is True


def test_a_failed_start_is_tried_again_at_the_next_reading() -> None:
    peering = _Peering()
    peering.records = {ME.identity: _fresh(10)}
    peering.failing = True
    asyncio.run(peering.check())
    assert peering.leading is None
    peering.failing = False
    asyncio.run(peering.check())
    assert peering.calls == [True, True]
    assert peering.leading is True


@pytest.mark.parametrize("lifetime", [0, 4])
def test_a_lifetime_under_five_seconds_is_refused(lifetime: int) -> None:
    with pytest.raises(ValidationError):
        OperatorSettings(cluster="edge-1", peering="ha", peering_lifetime_seconds=lifetime)
