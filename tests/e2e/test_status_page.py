"""The router's status page in a real browser: Debian's chromium, headless, driven by
Playwright (`tests/browser.py`).

One router over a real federation (three clusters, their operators, llama.cpp workers joined as
peers of edge-1 and edge-2), reaching its cluster through a relay the tests can cut, and asking
every caller for a key: the browser gives it as HTTP Basic credentials. The page, opened once,
must follow what happens without a reload: a peer that stops heartbeating, a request that
finishes, the cluster lost and found again. A second router, without a cluster, routes to 1,000
peers from a file: the page shows them a page at a time, problems first, by keyboard too. The
screenshots in docs/ come from these tests.
"""

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import openai
import pytest
import yaml
from kubernetes import client
from playwright.sync_api import BrowserContext, Page, Playwright, expect, sync_playwright

from edgellm.dev.federation import LocalFederation
from edgellm.kube import api_client, objects
from edgellm.worker.models import TINY, write_model
from tests.browser import chromium, chromium_missing
from tests.builders import many_peers
from tests.e2e.helpers import (
    OperatorProcess,
    ServingPeer,
    TcpRelay,
    eventually,
    joined_peer,
    peer_ready,
    routed_peers,
    router_process,
    serving_peer,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"
KEY = "sk-status-viewer-0123456789"
SECRET = "status-page-keys"
CREDENTIALS = {"username": "viewer", "password": KEY}
WAIT_MS = 30_000
LOCAL, REMOTE = "edge-1-status-a", "edge-2-status-b"


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    missing = chromium_missing()
    if missing:
        pytest.fail(missing)
    with sync_playwright() as driver:
        yield driver


@dataclass
class Lab:
    url: str
    relay: TcpRelay
    peers: dict[str, ServingPeer]
    model: Path
    kubeconfigs: dict[str, Path]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0)

    def status(self, query: str = "") -> dict[str, Any]:
        answer = httpx.get(f"{self.url}/v1/federation{query}", headers=_bearer(), timeout=10)
        answer.raise_for_status()
        return dict(answer.json())


def _bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def lab(
    joined: LocalFederation,
    operators: dict[str, OperatorProcess],
    cluster_kubeconfigs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Lab]:
    """A router in edge-1, through a relay, over a tiny-model peer of edge-1 and one of
    edge-2 (a mirror in edge-1); every caller needs a key, loopback included."""
    directory = tmp_path_factory.mktemp("status-page")
    model = write_model(directory / "models" / "tiny-random.gguf", TINY)
    edge1 = joined.clusters[0]
    with api_client(edge1.kubeconfig("admin")) as api:
        secret = client.V1Secret(
            metadata=client.V1ObjectMeta(name=SECRET), string_data={"viewer": KEY}
        )
        client.CoreV1Api(api).create_namespaced_secret("default", secret)
    server = urlparse(edge1.server)
    assert server.hostname is not None
    assert server.port is not None
    relay = TcpRelay((server.hostname, server.port))
    relay.restore()
    kubeconfig = directory / "router.kubeconfig"
    relayed = edge1.kubeconfig("admin", server=f"https://127.0.0.1:{relay.port}")
    kubeconfig.write_text(yaml.safe_dump(relayed))
    try:
        with (
            serving_peer(cluster_kubeconfigs["edge-1"], LOCAL, model, kv_events=True) as local,
            serving_peer(cluster_kubeconfigs["edge-2"], REMOTE, model) as remote,
        ):
            admin = edge1.kubeconfig("admin")
            eventually(lambda: peer_ready(admin, REMOTE), 60, "edge-1 sees edge-2's peer")
            options = (f"--api-keys-secret={SECRET}", "--status-page=keys", "--probe-interval=1")
            with router_process(kubeconfig, directory / "router.log", *options) as url:
                eventually(lambda: routed_peers(url) >= 2, 60, "the router lists both peers")
                yield Lab(url, relay, {LOCAL: local, REMOTE: remote}, model, cluster_kubeconfigs)
    finally:
        relay.cut()
        with api_client(edge1.kubeconfig("admin")) as api:
            client.CoreV1Api(api).delete_namespaced_secret(SECRET, "default")


@pytest.fixture(scope="module")
def browser(lab: Lab, playwright: Playwright) -> Iterator[BrowserContext]:
    with chromium(playwright, http_credentials=CREDENTIALS) as context:
        yield context


@pytest.fixture
def page(lab: Lab, browser: BrowserContext) -> Iterator[Page]:
    """The status page, opened once: a test that expects a change sees it come live."""
    page = browser.new_page()
    page.goto(lab.url)
    expect(page.locator("html")).to_have_attribute("data-live", "on")
    page.evaluate("window.openedOnce = true")  # gone if anything reloads the page
    yield page
    assert page.evaluate("window.openedOnce === true"), "the page reloaded"
    page.close()


def test_the_page_shows_each_member_peer_and_model_with_its_state(lab: Lab, page: Page) -> None:
    for member in ("edge-1", "edge-2", "edge-3"):
        expect(page.locator(f"#member-{member} .state")).to_have_text("reachable")
    for name, cluster in ((LOCAL, "edge-1"), (REMOTE, "edge-2")):
        row = page.locator(f"#peer-{name}")
        expect(row).to_have_attribute("data-state", "ready")
        expect(row.locator("td").first).to_have_text(cluster)
        expect(row.locator(".held")).to_have_text("tiny-random")
        # What only the worker can say comes with the router's first probes, live.
        expect(row.locator(".loaded")).to_have_text("tiny-random", timeout=WAIT_MS)
        expect(row.locator(".link")).to_contain_text("direct,", timeout=WAIT_MS)
    model = page.locator("#model-tiny-random")
    expect(model.locator(".served")).to_contain_text("edge-1")
    expect(model.locator(".served")).to_contain_text("edge-2 (1)")
    assert int(model.locator(".replicas").inner_text()) >= 2

    _drain(lab, REMOTE, True)
    try:
        expect(page.locator(f"#peer-{REMOTE}")).to_have_attribute(
            "data-state", "draining", timeout=WAIT_MS
        )
        expect(page.locator(f"#peer-{REMOTE} .state-cell .why")).to_contain_text("Unschedulable")
        expect(model.locator(".served")).not_to_contain_text("edge-2")
    finally:
        _drain(lab, REMOTE, False)
    expect(page.locator(f"#peer-{REMOTE}")).to_have_attribute(
        "data-state", "ready", timeout=WAIT_MS
    )


def _drain(lab: Lab, name: str, unschedulable: bool) -> None:
    """`spec.unschedulable` of a peer, in its own cluster (edge-2): the mirror follows."""
    with api_client(yaml.safe_load(lab.kubeconfigs["edge-2"].read_text())) as api:
        objects.patch(api, objects.PEER_NODES, name, {"spec": {"unschedulable": unschedulable}})


def test_a_request_shows_as_it_runs_and_when_it_finishes_without_a_reload(
    lab: Lab, page: Page
) -> None:
    stream = lab.client().completions.create(
        model="tiny-random",
        prompt="the federation at work",
        max_tokens=1500,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    first = next(iter(stream))
    request_id = first.id.removeprefix("cmpl-")[:12]
    # The JSON, read while the stream is open: the request runs, and counts as in flight.
    running = lab.status()
    (record,) = [r for r in running["requests"] if r["id"] == request_id]
    assert record["outcome"] == "running"
    (model,) = [m for m in running["models"] if m["name"] == "tiny-random"]
    assert model["inFlight"] >= 1
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None

    row = page.locator(f"#request-{request_id}")
    expect(row).to_have_attribute("data-outcome", "length", timeout=WAIT_MS)
    expect(row.locator(".tokens")).to_have_text(
        f"{usage.prompt_tokens} → {usage.completion_tokens}"
    )
    expect(row.locator(".peers")).to_contain_text("edge-")
    expect(row.locator(".ttft")).to_contain_text("ms")
    cached = lab.client().completions.create(
        model="tiny-random", prompt="the federation at work", max_tokens=8, temperature=0
    )
    expect(page.locator(f"#request-{cached.id.removeprefix('cmpl-')[:12]}")).to_have_attribute(
        "data-outcome",
        "stop" if cached.choices[0].finish_reason == "stop" else "length",
        timeout=WAIT_MS,
    )
    expect(page.locator("#model-tiny-random .hit-rate")).not_to_have_text(
        "—"
    )  # the cache hit rate, once requests came through
    page.screenshot(path=DOCS / "status-page.png", full_page=True)


def test_a_peer_that_stops_heartbeating_turns_not_ready_on_the_open_page(
    lab: Lab, page: Page
) -> None:
    name = "edge-1-status-c"
    worker = lab.peers[LOCAL].worker
    kubeconfig = lab.kubeconfigs["edge-1"]
    with joined_peer(kubeconfig, name, worker.url, lab.model.parent, "--heartbeat-ttl=5") as join:
        row = page.locator(f"#peer-{name}")
        expect(row).to_have_attribute("data-state", "ready", timeout=WAIT_MS)
        join.terminate()  # it stops heartbeating; the PeerNode stays
        join.wait(timeout=30)
        expect(row).to_have_attribute("data-state", "not-ready", timeout=WAIT_MS)
        expect(row.locator(".state-cell .why")).to_contain_text("HeartbeatExpired")
        # The operator removes it after its grace (8 s in these tests): the row goes too.
        expect(row).to_have_count(0, timeout=WAIT_MS)


def test_the_page_warns_when_the_router_loses_its_cluster(lab: Lab, page: Page) -> None:
    banner = page.locator("#cluster-lost [role=alert]")
    expect(banner).to_have_count(0)
    lab.relay.cut()
    try:
        expect(banner).to_contain_text("lost its cluster", timeout=WAIT_MS)
        expect(page.locator(f"#peer-{LOCAL}")).to_be_visible()  # what it knew stays shown
        page.screenshot(path=DOCS / "status-page-cluster-lost.png")
    finally:
        lab.relay.restore()
    expect(banner).to_have_count(0, timeout=WAIT_MS)


def test_without_javascript_the_page_is_plain_tables_behind_a_key(
    lab: Lab, playwright: Playwright
) -> None:
    refused = httpx.get(lab.url, timeout=10)  # a browser's user pressing Cancel sees this
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Basic")
    assert "This router asks for an API key" in refused.text
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    with chromium(playwright, java_script_enabled=False) as browser:
        page = browser.new_page()
        page.set_extra_http_headers({"Authorization": f"Basic {basic}"})
        page.goto(lab.url)
        expect(page.locator(f"#peer-{LOCAL}")).to_have_attribute("data-state", "ready")
        expect(page.locator("html")).not_to_have_attribute("data-live", "on")
        page.select_option("select[name=state]", "ready")
        page.fill("input[name=q]", "edge-2")
        page.click("button[type=submit]")
        expect(page.locator("#peers-body tr")).to_have_count(1)
        expect(page.locator(f"#peer-{REMOTE}")).to_be_visible()
        assert "state=ready" in page.url


# --- a thousand peers ------------------------------------------------------------------------


@dataclass
class Crowd:
    url: str
    peers: list[dict[str, Any]]


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crowd]:
    """A router without a cluster over 1,000 peers from a file; nothing answers at their
    endpoints, so it does not probe them."""
    directory = tmp_path_factory.mktemp("crowd")
    peers = many_peers(1000, heartbeat=datetime.now(UTC).isoformat())
    listed = directory / "peers.yaml"
    listed.write_text(yaml.safe_dump_all(peers))
    options = ("--anonymous", f"--peers-file={listed}", "--probe-interval=0")
    with router_process(None, directory / "router.log", *options) as url:
        yield Crowd(url, peers)


def _expected_states(peers: list[dict[str, Any]]) -> dict[str, int]:
    """Each peer's state straight from its conditions, worst first."""
    counts = {"unreachable": 0, "not-ready": 0, "draining": 0, "ready": 0}
    for peer in peers:
        held = {c["type"]: c["status"] for c in peer["status"]["conditions"]}
        if held.get("Reachable") == "False":
            counts["unreachable"] += 1
        elif held.get("Draining") == "True":
            counts["draining"] += 1
        elif held.get("Ready") != "True":
            counts["not-ready"] += 1
        else:
            counts["ready"] += 1
    return counts


def test_a_thousand_peers_come_a_page_at_a_time_problems_first(
    crowd: Crowd, playwright: Playwright
) -> None:
    expected = _expected_states(crowd.peers)
    with chromium(playwright) as browser:
        page = browser.new_page()
        started = time.perf_counter()
        page.goto(crowd.url)
        print(f"1,000 peers: the page loaded in {time.perf_counter() - started:.3f}s")
        expect(page.locator("#peers caption")).to_contain_text("1000 peers")
        expect(page.locator("#peers caption")).to_contain_text("page 1 of 20")
        for state, count in expected.items():
            counted = page.locator("#peer-counts > span", has=page.locator(f".state-{state}"))
            expect(counted).to_have_text(f"{state} {count}")
        rows = page.locator("#peers-body tr")
        expect(rows).to_have_count(50)
        assert set(rows.evaluate_all("rows => rows.map(r => r.dataset.state)")) == {"unreachable"}

        # By keyboard: the skip link first, then on to the next page of peers.
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "skip"
        page.keyboard.press("Enter")
        assert page.evaluate("document.activeElement.id") == "peers-heading"
        page.locator("#peer-pages a[rel=next]").focus()
        page.keyboard.press("Enter")
        expect(page.locator("#peers caption")).to_contain_text("page 2 of 20")

        page.select_option("select[name=state]", "draining")
        page.click("button[type=submit]")
        expect(page.locator("#peers caption")).to_contain_text(
            f"{expected['draining']} peers match"
        )
        states = rows.evaluate_all("rows => rows.map(r => r.dataset.state)")
        assert set(states) == {"draining"}
        _assert_accessible(page)

    whole = httpx.get(f"{crowd.url}/v1/federation?per_page=1000", timeout=30).json()
    assert len(whole["peers"]["items"]) == 1000
    assert sum(whole["peerStates"].values()) == 1000


# WCAG 2's contrast ratio of every text in the tables, banners and badges against the colour
# behind it; tables with captions and header scopes; every form control labelled.
_AUDIT = """() => {
  const rgb = c => c.match(/[\\d.]+/g).slice(0, 3).map(Number);
  const lum = c => {
    const [r, g, b] = rgb(c).map(v => { v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const behind = el => {
    for (; el; el = el.parentElement) {
      const bg = getComputedStyle(el).backgroundColor;
      if (bg !== "rgba(0, 0, 0, 0)" && bg !== "transparent") return bg;
    }
    return "rgb(255, 255, 255)";
  };
  const low = [];
  const texts = "td, th, caption, .state, .why, a, label, h1, h2, p";
  for (const el of document.querySelectorAll(texts)) {
    if (!el.textContent.trim()) continue;
    const [a, b] = [lum(getComputedStyle(el).color), lum(behind(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) low.push(`${el.tagName}.${el.className}: ${ratio.toFixed(2)}`);
  }
  const tables = [...document.querySelectorAll("table")];
  return {
    low,
    uncaptioned: tables.filter(t => !t.caption).map(t => t.id),
    unscoped: [...document.querySelectorAll("thead th")].filter(th => th.scope !== "col").length,
    unlabelled: [...document.querySelectorAll("input:not([type=hidden]), select")]
      .filter(c => !c.labels.length).map(c => c.name),
  };
}"""


def _assert_accessible(page: Page) -> None:
    audit = page.evaluate(_AUDIT)
    assert audit == {"low": [], "uncaptioned": [], "unscoped": 0, "unlabelled": []}


def test_the_status_json_needs_the_key_the_page_does(lab: Lab) -> None:
    refused = httpx.get(f"{lab.url}/v1/federation", timeout=10)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    status = lab.status("?state=ready&q=edge-1-status")
    assert [p["name"] for p in status["peers"]["items"]] == [LOCAL]
    bad = httpx.get(f"{lab.url}/v1/federation?per_page=0", headers=_bearer(), timeout=10)
    assert bad.status_code == 400
    assert "per_page" in bad.json()["error"]["message"]
