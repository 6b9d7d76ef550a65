"""The status page's pure parts: each peer's state and why, pages of peers worst first, models
and splits from the router's request log, members, and who may look (through the real app,
in process, with no cluster and no worker behind it)."""

import asyncio
import base64
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from urllib3 import HTTPSConnectionPool
from urllib3.connection import HTTPSConnection
from urllib3.exceptions import MaxRetryError, NewConnectionError

from edgellm.api import FederationMember, InferenceRequestSpec, PeerNode
from edgellm.kvcache.index import KVIndex
from edgellm.kvcache.subscriptions import KVSubscriptions
from edgellm.router.app import RouterSettings, create_app
from edgellm.router.dispatch import NoWorkerError
from edgellm.router.peers import PeerDirectory, why
from edgellm.router.probes import Probe
from edgellm.router.requestlog import RequestLog
from edgellm.router.status import PeerQuery, Sources, federation_status, peer_state
from edgellm.router.statuspage import bearer
from edgellm.scheduling.layersplit import LayerPlan, StagePlan
from edgellm.workerapi import FinishReason, Job, Outcome, Piece, Placement
from tests.builders import NOW, candidate, condition, many_peers, peer_body

MOMENT = datetime.fromisoformat(NOW)


def _probe(error: str | None = None) -> Probe:
    return Probe(MOMENT, None if error else 3.0, None if error else ("tiny-random",), error)


@pytest.mark.parametrize(
    ("conditions", "failing", "probe", "state", "why"),
    [
        ([condition("Ready", True, "HeartbeatFresh")], False, None, "ready", "HeartbeatFresh"),
        ([condition("Ready", False, "HeartbeatExpired")], False, None, "not-ready", "Expired"),
        ([], False, None, "not-ready", "has not assessed"),
        (
            [condition("Ready", True), condition("Reachable", False, "MemberUnreachable")],
            False,
            None,
            "unreachable",
            "MemberUnreachable",
        ),
        (
            [condition("Ready", True), condition("Draining", True, "Unschedulable")],
            False,
            None,
            "draining",
            "Unschedulable",
        ),
        ([condition("Ready", True)], True, None, "failing", "request failed"),
        ([condition("Ready", True)], False, _probe("refused"), "unreachable", "refused"),
        ([condition("Ready", True)], False, _probe(), "ready", "Ready"),
    ],
)
def test_a_peer_s_state_is_its_worst_condition_with_why(
    conditions: list[dict[str, Any]], failing: bool, probe: Probe | None, state: str, why: str
) -> None:
    body = peer_body("p", ready=None)
    body["status"]["conditions"] = conditions
    found, reason = peer_state(PeerNode.model_validate(body), failing, probe)
    assert (found, why in reason) == (state, True)


def _sources(bodies: list[dict[str, Any]], log: RequestLog | None = None) -> Sources:
    peers = PeerDirectory(None, KVSubscriptions(KVIndex()))
    peers.set_peers(bodies)
    return Sources("edge-1", peers, peers.kv.index, log or RequestLog(), {})


def test_peers_come_worst_first_a_page_at_a_time_filtered_by_state_and_text() -> None:
    sources = _sources(many_peers(120))
    status = federation_status(sources, [], None, PeerQuery(per_page=50), MOMENT)
    assert sum(status.peer_states.values()) == 120
    assert (status.peers.total, status.peers.pages, len(status.peers.items)) == (120, 3, 50)
    first = status.peers.items[: status.peer_states["unreachable"]]
    assert {p.state for p in first} == {"unreachable"}

    last = federation_status(sources, [], None, PeerQuery(page=9, per_page=50), MOMENT)
    assert last.peers.page == 3  # past the end: the last page
    assert len(last.peers.items) == 20

    draining = federation_status(sources, [], None, PeerQuery(state="draining"), MOMENT)
    assert draining.peers.total == status.peer_states["draining"]
    assert {p.state for p in draining.peers.items} == {"draining"}
    named = federation_status(sources, [], None, PeerQuery(q="PEER-0007"), MOMENT)
    assert [p.name for p in named.peers.items] == ["edge-2-peer-0007"]


def _plan(model_layers: tuple[tuple[str, int, int], ...]) -> LayerPlan:
    stages = tuple(StagePlan(candidate(name), first, last) for name, first, last in model_layers)
    return LayerPlan(stages, context=1024, layer_bytes=1)


def _outcome(placement: Placement, reason: FinishReason = "length") -> Outcome:
    return Outcome(reason, 40, 12, 30, placement, 1, 0.5, 0.08)


async def _through(log: RequestLog, job: Job, *items: Piece | Outcome | Exception) -> None:
    async def pieces() -> AsyncGenerator[Piece | Outcome, None]:
        for item in items:
            if isinstance(item, Exception):
                raise item
            yield item

    async for _ in log.track(job, pieces()):
        pass


def _job(model: str = "tiny-random") -> Job:
    return Job("0123456789abcdef", InferenceRequestSpec(model=model, prompt="hello"))


def test_the_request_log_records_outcomes_traffic_and_split_plans() -> None:
    log = RequestLog()
    plan = _plan((("lead", 0, 3), ("lend", 4, 7)))
    split = Placement("lead", "http://lead:8600", plan)
    whole = Placement("a", "http://a:8600", prefill_peer="b")

    async def run() -> None:
        await _through(log, _job(), Piece("x", whole), _outcome(whole))
        await _through(log, _job("big"), Piece("x", split), _outcome(split, "stop"))
        with pytest.raises(NoWorkerError):
            await _through(log, _job(), NoWorkerError("no worker can take it"))
        abandoned = log.track(_job(), _pieces_forever(whole))
        await anext(abandoned)
        await abandoned.aclose()

    asyncio.run(run())
    done, splitted, failed, left = log.recent
    assert (done.peer, done.prefill_peer, done.outcome) == ("a", "b", "length")
    assert (done.ttft_seconds, done.completion_tokens, done.cached_tokens) == (0.08, 12, 30)
    assert (splitted.stages, splitted.outcome) == (("lend",), "stop")
    assert (failed.outcome, failed.detail) == ("failed", "no worker can take it")
    assert left.outcome == "abandoned"
    traffic = log.traffic["tiny-random"]
    assert traffic.in_flight == 0
    assert traffic.hit_rate() == 30 / 40
    now = datetime.now(UTC).timestamp()
    assert traffic.tokens_per_second(now) == 12 / 60
    assert traffic.tokens_per_second(now + 61) == 0
    assert log.splits["big"].plan is plan


async def _pieces_forever(placement: Placement) -> AsyncGenerator[Piece | Outcome, None]:
    while True:
        yield Piece("x", placement)


def test_models_and_splits_show_where_they_run_and_the_router_s_traffic() -> None:
    log = RequestLog()
    plan = _plan((("edge-1-peer-0001", 0, 5), ("edge-1-peer-0002", 6, 9)))
    placement = Placement("edge-1-peer-0001", "http://x", plan)
    asyncio.run(_through(log, _job(), Piece("x", placement), _outcome(placement)))
    bodies = [
        peer_body("a", cluster="edge-1"),
        peer_body("b", cluster="edge-2"),
        peer_body("c", cluster="edge-2", ready=False),
        peer_body("edge-1-peer-0001"),
        peer_body("edge-1-peer-0002", models=[]),
    ]
    sources = _sources(bodies, log)
    sources.peers.in_flight["a"] = 2
    status = federation_status(sources, [], None, PeerQuery(), MOMENT)
    (model,) = status.models
    assert model.clusters == {"edge-1": 2, "edge-2": 1}
    assert (model.replicas, model.in_flight, model.cache_hit_rate) == (3, 0, 0.75)
    (shown,) = status.splits
    assert (shown.model, shown.leader) == ("tiny-random", "edge-1-peer-0001")
    assert [(s.peer, s.first_layer, s.last_layer) for s in shown.stages] == [
        ("edge-1-peer-0001", 0, 5),
        ("edge-1-peer-0002", 6, 9),
    ]
    by_name = {p.name: p for p in status.peers.items}
    assert by_name["a"].routed_in_flight == 2
    lent = by_name["edge-1-peer-0002"].layers
    assert [(x.model, x.first_layer, x.last_layer, x.leads) for x in lent] == [
        ("tiny-random", 6, 9, False)
    ]
    assert status.requests[0].stages == ["edge-1-peer-0002"]


def test_members_say_whether_they_answer_since_when_and_their_peers() -> None:
    since = MOMENT - timedelta(minutes=5)
    member = FederationMember.model_validate(
        {
            "metadata": {"name": "edge-2"},
            "spec": {"server": "https://10.0.0.2:6443", "caBundle": "x", "credentialsSecret": "s"},
            "status": {
                "conditions": [
                    {**condition("Reachable", False, "ProbeFailed"), "message": "refused"},
                    condition("Synced", False, "MemberUnreachable"),
                ],
                "lastProbeTime": NOW,
                "mirroredPeers": 3,
            },
        }
    )
    member.status.conditions[0].last_transition_time = since
    sources = _sources([peer_body("a"), peer_body("b", cluster="edge-2")])
    status = federation_status(sources, [member], "the apiserver is away", PeerQuery(), MOMENT)
    own, other = status.members
    assert (own.name, own.this_cluster, own.peers) == ("edge-1", True, 1)
    assert (other.reachable, other.since, other.peers) == (False, since, 1)
    assert other.reason == "ProbeFailed: refused"
    assert (other.mirrored_peers, other.last_sync) == (3, None)
    assert status.cluster_error is not None
    assert status.cluster_error.message == "the apiserver is away"


KEY = "sk-viewer"


def _app(who: str) -> TestClient:
    settings = RouterSettings(anonymous=False, status_page=who, probe_interval_seconds=0)
    app = create_app(settings, static_peers=[peer_body("edge-1-a")])
    app.state.router.access.set_secret({"viewer": base64.b64encode(KEY.encode()).decode()})
    return TestClient(app, client=("127.0.0.1", 40000))


def _basic(user: str, key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


def test_loopback_sees_the_page_without_a_key_and_everyone_else_needs_one() -> None:
    with _app("loopback") as local:
        page = local.get("/")
        assert page.status_code == 200
        assert 'id="peer-edge-1-a" data-state="ready"' in page.text
        assert local.get("/status.js").headers["content-type"].startswith("text/javascript")
        proxied = local.get("/", headers={"X-Forwarded-For": "203.0.113.9"})
        assert proxied.status_code == 401
        assert proxied.headers["www-authenticate"].startswith("Basic")
        assert local.get("/v1/federation", headers=_basic("anyone", KEY)).status_code == 200
    with _app("keys") as keyed:
        refused = keyed.get("/v1/federation")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert keyed.get("/", headers=_basic("anyone", "sk-wrong")).status_code == 401
        assert keyed.get("/", headers=_basic("anyone", KEY)).status_code == 200
        status = keyed.get("/v1/federation", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert status["peers"]["items"][0]["name"] == "edge-1-a"
        bad = keyed.get("/v1/federation?state=gone", headers=_basic("x", KEY))
        assert bad.status_code == 400
        assert "state" in bad.json()["error"]["message"]
        assert keyed.get("/?page=0", headers=_basic("x", KEY)).status_code == 400


def test_basic_credentials_become_the_bearer_key_they_carry() -> None:
    assert bearer(_basic("anyone", "sk-a:b")["Authorization"]) == "Bearer sk-a:b"
    assert bearer("Bearer sk-x") == "Bearer sk-x"
    assert bearer("Basic not-base64!") is None
    assert bearer(None) is None


def test_a_lost_cluster_is_said_in_a_few_words() -> None:
    connection = HTTPSConnection("127.0.0.1", 6443)  # not connected: a name for the message
    cause = NewConnectionError(
        connection, "Failed to establish a new connection: [Errno 111] refused"
    )
    error = MaxRetryError(HTTPSConnectionPool("127.0.0.1"), "/apis/edgellm.io", cause)
    assert why(error) == "Failed to establish a new connection: [Errno 111] refused"
    assert why(TimeoutError()) == "TimeoutError"
