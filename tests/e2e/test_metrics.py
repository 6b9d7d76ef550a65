"""Metrics end to end: a real operator, router and worker, after they served requests, export
/metrics pages that `promtool check metrics` finds clean and that hold the families the
dashboards chart; a real Prometheus scrapes all three and answers every dashboard query."""

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from edgellm.dev.cluster import free_port
from edgellm.dev.federation import LocalFederation
from edgellm.dev.tools import tool
from edgellm.kube import api_client
from edgellm.worker.models import TINY, write_model
from tests.e2e.helpers import (
    OperatorProcess,
    eventually,
    routed_peers,
    router_process,
    serving_peer,
)

GROUP, VERSION = "edgellm.io", "v1alpha1"
DASHBOARDS = Path(__file__).parents[2] / "charts" / "edgellm" / "dashboards"
REQUIRED = {
    "operator": {
        "edgellm_operator_reconcile_duration_seconds",
        "edgellm_operator_inference_requests",
        "edgellm_operator_scheduling_duration_seconds",
        "edgellm_operator_peers",
        "edgellm_operator_peer_last_heartbeat_timestamp_seconds",
        "edgellm_operator_peer_accelerators",
        "edgellm_operator_federation_members",
        "edgellm_operator_federation_sync_lag_seconds",
        "edgellm_operator_leading",
    },
    "router": {
        "edgellm_router_requests",
        "edgellm_router_time_to_first_token_seconds",
        "edgellm_router_inter_token_latency_seconds",
        "edgellm_router_request_duration_seconds",
        "edgellm_router_prompt_tokens",
        "edgellm_router_cached_prompt_tokens",
        "edgellm_router_generation_tokens",
        "edgellm_router_routing_decisions",
        "edgellm_router_disaggregation_decisions",
        "edgellm_router_kv_transfer_duration_seconds",
    },
    "worker": {
        "edgellm_worker_generated_tokens",
        "edgellm_worker_decode_tokens_per_second",
        "edgellm_worker_running_requests",
        "edgellm_worker_queued_requests",
        "edgellm_worker_kv_blocks",
        "edgellm_worker_ipfs_bytes",
        "edgellm_worker_ipfs_fetch_duration_seconds",
    },
}


@dataclass
class Served:
    """Where each component serves /metrics (host:port), and how to make more traffic."""

    targets: dict[str, str]
    router: str
    worker: str

    def traffic(self) -> None:
        """A chat completion, a streamed one, a bad request through the router, and a
        generation straight on the worker."""
        chat = {"model": "tiny-random", "messages": [{"role": "user", "content": "hello"}]}
        sampled = {**chat, "max_tokens": 8, "ignore_eos": True}
        answer = httpx.post(f"{self.router}/v1/chat/completions", json=sampled, timeout=60)
        assert answer.status_code == 200, answer.text
        with httpx.stream(
            "POST", f"{self.router}/v1/chat/completions", json={**sampled, "stream": True}
        ) as streamed:
            assert streamed.status_code == 200
            streamed.read()
        bad = httpx.post(f"{self.router}/v1/chat/completions", json={**chat, "temperature": 7})
        assert bad.status_code == 400
        body = {"model": "tiny-random", "prompt": "hi", "max_tokens": 8, "temperature": 0}
        direct = httpx.post(f"{self.worker}/v1/completions", json=body, timeout=60)
        assert direct.status_code == 200, direct.text


def _inference_request(joined: LocalFederation, name: str) -> dict[str, Any]:
    """Submits an InferenceRequest in edge-1 and waits for it to finish."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceRequest",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"model": "tiny-random", "prompt": "metrics", "sampling": {"maxTokens": 4}},
    }
    with api_client(joined.clusters[0].kubeconfig("admin")) as api:
        objects = client.CustomObjectsApi(api)
        objects.create_namespaced_custom_object(
            GROUP, VERSION, "default", "inferencerequests", body
        )

        def finished() -> dict[str, Any] | None:
            found = objects.get_namespaced_custom_object(
                GROUP, VERSION, "default", "inferencerequests", name
            )
            status: dict[str, Any] = found.get("status") or {}
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        return eventually(finished, 120, f"{name} finishes")


@pytest.fixture(scope="module")
def served(
    joined: LocalFederation,
    operators: dict[str, OperatorProcess],
    cluster_kubeconfigs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """A tiny-model peer of edge-1 and an anonymous router in edge-1, after both served
    requests, and edge-1's operator after it ran an InferenceRequest."""
    model = write_model(tmp_path_factory.mktemp("models") / "tiny-random.gguf", TINY)
    kubeconfig = cluster_kubeconfigs["edge-1"]
    with serving_peer(kubeconfig, "edge-1-metrics", model, kv_events=True) as peer:
        log = tmp_path_factory.mktemp("router") / "router.log"
        with router_process(kubeconfig, log, "--anonymous") as router:
            eventually(lambda: routed_peers(router) >= 1, 60, "the router lists the peer")
            served = Served(
                {
                    "operator": f"127.0.0.1:{operators['edge-1'].metrics_port}",
                    "router": router.removeprefix("http://"),
                    "worker": peer.worker.url.removeprefix("http://"),
                },
                router,
                peer.worker.url,
            )
            served.traffic()
            status = _inference_request(joined, "metrics-request")
            assert status["phase"] == "Succeeded", status
            yield served


def _scrape(target: str) -> str:
    return httpx.get(f"http://{target}/metrics", timeout=10).text


@pytest.mark.parametrize("component", ["operator", "router", "worker"])
def test_metrics_pass_promtool_and_hold_the_required_families(
    served: Served, component: str
) -> None:
    text = _scrape(served.targets[component])
    checked = subprocess.run(
        [str(tool("promtool")), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert not (checked.stdout + checked.stderr).strip()
    families = {f.name for f in text_string_to_metric_families(text)}
    assert REQUIRED[component] <= families, sorted(REQUIRED[component] - families)


def _dashboard_queries() -> list[str]:
    return [
        target["expr"].replace("$__rate_interval", "1m")
        for path in sorted(DASHBOARDS.glob("*.json"))
        for panel in json.loads(path.read_text())["panels"]
        for target in panel["targets"]
    ]


@pytest.fixture
def prometheus(served: Served, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus scraping the three components every second; its API's URL."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": name, "static_configs": [{"targets": [target]}]}
            for name, target in served.targets.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                str(tool("prometheus")),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def all_up() -> bool:
        try:
            targets = httpx.get(f"{url}/api/v1/targets", timeout=2).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        healths = [t["health"] for t in targets["activeTargets"]]
        return len(healths) == len(served.targets) and all(h == "up" for h in healths)

    try:
        eventually(all_up, 60, "Prometheus scrapes the operator, the router and the worker")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        print((tmp_path / "prometheus.log").read_text()[-4000:])


def test_prometheus_answers_every_dashboard_query(served: Served, prometheus: str) -> None:
    time.sleep(3)  # rate() needs two scrapes on each side of the traffic
    served.traffic()
    queries = _dashboard_queries()
    assert queries

    def empty() -> list[str]:
        missing = []
        for query in queries:
            answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=10)
            assert answer.status_code == 200, f"{query}: {answer.text}"
            if not answer.json()["data"]["result"]:
                missing.append(query)
        return missing

    deadline = time.monotonic() + 30
    while (missing := empty()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not missing, missing
