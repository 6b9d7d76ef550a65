"""The Grafana dashboards in charts/edgellm/dashboards: well-formed, and every query names only
metrics the operator, the router and the worker export."""

import asyncio
import json
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import Metric
from prometheus_client.parser import text_string_to_metric_families

from edgellm.dev.errors import MissingToolError
from edgellm.dev.tools import tool
from edgellm.operator.metrics import OperatorMetrics
from edgellm.router.metrics import RouterMetrics
from edgellm.worker.server import create_app
from edgellm.worker.vllm import VllmBackend, VllmSettings

DASHBOARDS = Path(__file__).parents[2] / "charts" / "edgellm" / "dashboards"
NAMES = ("overview", "federation", "kv-cache", "prefill-decode")
METRIC = re.compile(r"\bedgellm_[a-zA-Z0-9_:]*")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def load(name: str) -> dict[str, Any]:
    return dict(json.loads((DASHBOARDS / f"{name}.json").read_text()))


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def series_names(families: Iterable[Metric]) -> set[str]:
    """The names a scrape's series can have: counters end in _total, histograms in
    _bucket, _sum and _count."""
    return {f.name + suffix for f in families for suffix in SUFFIXES.get(f.type, ("",))}


def worker_families(tmp_path: Path) -> list[Metric]:
    """A worker's /metrics, through its app; the backend is never started."""
    settings = VllmSettings.model_validate({"model": "m", "servedModelName": "m"})
    app = create_app(VllmBackend(settings, tmp_path), "m")

    async def scrape() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as http:
            return (await http.get("/metrics")).text

    return list(text_string_to_metric_families(asyncio.run(scrape())))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    return series_names(
        [
            *OperatorMetrics().registry.collect(),
            *RouterMetrics().registry.collect(),
            *worker_families(tmp_path_factory.mktemp("worker")),
        ]
    )


def as_promql(expression: str) -> str:
    """The expression as Prometheus takes it, Grafana's interval variable replaced."""
    return expression.replace("$__rate_interval", "1m")


@pytest.mark.parametrize("name", NAMES)
def test_a_dashboard_is_grafana_json_with_a_prometheus_datasource_variable(name: str) -> None:
    dashboard = load(name)
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"]
    assert dashboard["title"]
    variables = dashboard["templating"]["list"]
    assert {"name": "datasource", "type": "datasource", "query": "prometheus"}.items() <= {
        k: v for k, v in variables[0].items() if k in ("name", "type", "query")
    }.items()
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("name", NAMES)
def test_panel_ids_are_unique_within_a_dashboard(name: str) -> None:
    ids = [p["id"] for p in load(name)["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_uids_are_unique() -> None:
    uids = [load(n)["uid"] for n in NAMES]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("name", NAMES)
def test_every_query_names_only_exported_metrics(name: str, exported: set[str]) -> None:
    for expression in expressions(load(name)):
        named = set(METRIC.findall(expression))
        assert named, expression
        assert named <= exported, f"{expression}: {sorted(named - exported)} are not exported"
        pairs = {"(": ")", "[": "]", "{": "}"}
        stack: list[str] = []
        for char in re.sub(r'"[^"]*"', '""', expression):
            if char in pairs:
                stack.append(pairs[char])
            elif char in pairs.values():
                assert stack, expression
                assert stack.pop() == char, expression
        assert not stack, expression
        for window in re.findall(r"\[([^\]]*)\]", expression):
            assert window == "$__rate_interval", expression


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    """Through promtool's rule checker, Prometheus' own parser: each query as a recording
    rule."""
    try:
        promtool = tool("promtool")
    except MissingToolError as e:
        pytest.skip(str(e))
    rules = [
        {"record": f"dashboard:{name.replace('-', '_')}:{i}", "expr": as_promql(expression)}
        for name in NAMES
        for i, expression in enumerate(expressions(load(name)))
    ]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    checked = subprocess.run(
        [str(promtool), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
