"""A home lab's first steps, for real: the images built here (`make images`), a cluster with a
real node (containerd, runc, kubelet, kube-proxy: `edgellm dev up --real-node`), `helm install`
of the chart into a namespace that enforces the restricted Pod Security Standard, the example
WorkerPool's worker pod registered as a peer and answering the example InferenceRequest and the
official `openai` client through the router's Service, a worker pod lost mid-request, and
`helm uninstall` leaving nothing of EdgeLLM's running.

The commands are those of the README's "Home lab with Helm" section (and `make demo-cluster`).
"""

import json
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai import OpenAI

from edgellm.dev.cluster import LocalCluster
from edgellm.dev.tools import tool
from tests.e2e.helpers import answers, edgellm, eventually

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="a real node needs root: network namespaces, cgroups and mounts"
)

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "edge-1"  # the name `edgellm dev up` gives its first cluster
SYSTEM = "edgellm-system"
API_KEY = "sk-home-lab-test"
START = 300.0  # a pod's start: the image is imported, the model generated, llama.cpp loaded


@dataclass(frozen=True)
class HomeLab:
    kubeconfig: Path

    def run(self, program: str, *args: str, timeout: float = 120, stdin: str | None = None) -> str:
        """kubectl or helm against the home lab; fails the test with their error."""
        result = subprocess.run(
            [str(tool(program)), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=ROOT,
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
        )
        assert result.returncode == 0, f"{program} {' '.join(args)}: {result.stderr}"
        return result.stdout

    def kubectl(self, *args: str, timeout: float = 120, stdin: str | None = None) -> str:
        return self.run("kubectl", *args, timeout=timeout, stdin=stdin)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.get("pods", "-n", namespace, "-l", selector)["items"]
        return items


@pytest.fixture(scope="module")
def home_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HomeLab]:
    workdir = tmp_path_factory.mktemp("home-lab")
    up = edgellm("dev", "up", "--real-node", f"--workdir={workdir}", timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        node = LocalCluster(CLUSTER, workdir / CLUSTER).real_node()
        assert node is not None
        yield HomeLab(workdir / "kubeconfig")
    finally:
        down = edgellm("dev", "down", f"--workdir={workdir}", timeout=300)
        assert down.returncode == 0, down.stderr
    # Nothing of the node is left: its network, its mounts, its processes.
    assert not Path(f"/run/netns/{node.network.netns}").exists()
    assert str(workdir) not in Path("/proc/self/mounts").read_text()
    assert not _processes_under(workdir)


def test_a_home_lab_installs_with_helm_and_answers_from_worker_pods(home_lab: HomeLab) -> None:
    lab = home_lab
    _install(lab)
    peer = _pool_peer_ready(lab, "tiny-random")

    lab.kubectl("apply", "-f", "examples/inference.yaml")
    request = _finished(lab, "hello")
    assert request["status"]["phase"] == "Succeeded", request["status"]
    assert request["status"]["assignment"]["decodePeer"] == peer
    assert request["status"]["output"]["completionTokens"] > 0
    assert request["status"]["output"]["text"]

    with _port_forward(lab, "service/edgellm-router", 8080) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
        # The router reads its API keys and the peers from the cluster every few seconds.
        answer = eventually(
            lambda: _ask(client, "tiny-random"), 60, "the router answers with the Secret's key"
        )
        assert answer.usage is not None
        assert answer.usage.completion_tokens > 0
        assert answer.choices[0].message.content

    _a_worker_lost_mid_request_loses_nothing(lab)

    _no_forbidden_and_no_restarts(lab)
    lab.kubectl("delete", "-f", "examples/inference.yaml", "-f", "examples/workerpool.yaml")
    # The operator removes a pool's peers once its pods are gone: before it is uninstalled.
    lab.kubectl(
        "wait", "--for=delete", "peernodes", "--selector=edgellm.io/worker-pool",
        "--timeout=120s", timeout=130,
    )  # fmt: skip
    lab.run("helm", "uninstall", "edgellm", "--namespace", SYSTEM, "--wait")
    try:
        eventually(lambda: not _left_behind(lab), 120, "helm uninstall leaves nothing behind")
    except pytest.fail.Exception:
        pytest.fail(f"left behind after helm uninstall: {_left_behind(lab)}")


# --- the steps --------------------------------------------------------------------------------


def _install(lab: HomeLab) -> None:
    lab.kubectl("create", "namespace", SYSTEM)
    for namespace in (SYSTEM, "default"):
        lab.kubectl(
            "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
        )
    lab.run(
        "helm",
        "install",
        "edgellm",
        "charts/edgellm",
        f"--namespace={SYSTEM}",
        f"--set=cluster.name={CLUSTER}",
        "--wait",
        "--timeout=5m",
        timeout=330,
    )
    lab.kubectl(
        "create", "secret", "generic", "edgellm-router-api-keys",
        f"--namespace={SYSTEM}", f"--from-literal=test={API_KEY}",
    )  # fmt: skip
    operators = lab.pods(SYSTEM, "app.kubernetes.io/component=operator")
    assert len(operators) == 2
    assert all(_ready(p) for p in operators)
    (router,) = lab.pods(SYSTEM, "app.kubernetes.io/component=router")
    assert _ready(router)
    node = f"{CLUSTER}-node-0"
    assert {p["spec"]["nodeName"] for p in [*operators, router]} == {node}
    # Exactly one replica of the operator works; the other stands by.
    leading = sorted(_operator_leading(lab, p["metadata"]["name"]) for p in operators)
    assert leading == [0.0, 1.0]


def _pool_peer_ready(lab: HomeLab, pool: str) -> str:
    """Applies the example WorkerPool and returns the PeerNode its worker pod registers."""
    lab.kubectl("apply", "-f", "examples/workerpool.yaml")
    lab.kubectl(
        "wait", "--for=condition=Available", f"workerpool/{pool}", f"--timeout={START:.0f}s",
        timeout=START + 10,
    )  # fmt: skip
    (pod,) = lab.pods("default", f"edgellm.io/worker-pool={pool}")
    assert pod["spec"]["nodeName"] == f"{CLUSTER}-node-0"
    name = f"{CLUSTER}-default-{pod['metadata']['name']}"
    # Available means a worker can be scheduled onto: its peer is Ready already.
    assert _peer_condition(lab, name, "Ready") == "True"
    peer = lab.get("peernode", name)
    assert peer["spec"]["endpoint"] == f"http://{pod['status']['podIP']}:8600"
    assert [m["name"] for m in peer["spec"]["models"]] == ["tiny-random"]
    return name


def _a_worker_lost_mid_request_loses_nothing(lab: HomeLab) -> None:
    """Two workers of the larger generated model; the one generating is killed (2 s of grace,
    less than the generation needs): the request goes on on the other from the tokens so far
    and succeeds once, and the Deployment's replacement pod registers as a peer of its own."""
    pool = yaml.safe_load((ROOT / "examples" / "workerpool.yaml").read_text())
    pool["metadata"]["name"] = pool["spec"]["model"] = "bench-random"
    pool["spec"]["source"] = {"generated": "bench-random"}
    pool["spec"]["resources"] = {"cpu": "250m", "memory": "768Mi"}
    pool["spec"]["minReplicas"] = 2
    lab.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(pool))
    eventually(
        lambda: len(_ready_pool_peers(lab, "bench-random")) == 2, START, "two Ready bench peers"
    )
    request = yaml.safe_load((ROOT / "examples" / "inference.yaml").read_text())
    request["metadata"]["name"] = "long"
    request["spec"]["model"] = "bench-random"
    request["spec"]["sampling"] |= {"maxTokens": 1500, "ignoreEos": True}
    lab.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(request))
    status = eventually(
        lambda: _running_with_output(lab, "long"), 60, "the long request is generating"
    )
    first = status["assignment"]["decodePeer"]
    pod = first.removeprefix(f"{CLUSTER}-default-")
    lab.kubectl("delete", "pod", pod, "--namespace=default", "--grace-period=2", "--wait=false")

    status = _finished(lab, "long")["status"]
    assert status["phase"] == "Succeeded", status
    assert status["assignment"]["attempts"] == 2
    assert status["assignment"]["decodePeer"] != first
    assert status["output"]["completionTokens"] == 1500
    reasons = [e["reason"] for e in _events(lab, "long")]
    assert reasons.count("PeerLost") == 1
    assert reasons.count("Generated") == 1

    def replaced() -> bool:
        peers = _ready_pool_peers(lab, "bench-random")
        return len(peers) == 2 and first not in peers

    eventually(replaced, START, "the replacement pod is a Ready peer, the lost pod's peer gone")
    lab.kubectl("delete", "--namespace=default", "workerpool/bench-random", "inferencerequest/long")


def _no_forbidden_and_no_restarts(lab: HomeLab) -> None:
    for component in ("operator", "router"):
        for pod in lab.pods(SYSTEM, f"app.kubernetes.io/component={component}"):
            name = pod["metadata"]["name"]
            restarts = [s["restartCount"] for s in pod["status"]["containerStatuses"]]
            assert restarts == [0], f"{name} restarted: its earlier logs are lost"
            log = lab.kubectl("logs", name, f"--namespace={SYSTEM}")
            assert "Forbidden" not in log, f"{name}:\n{log[-4000:]}"


def _left_behind(lab: HomeLab) -> list[str]:
    """EdgeLLM's pods, Deployments and PeerNodes, anywhere."""
    part_of = "--selector=app.kubernetes.io/part-of=edgellm"
    found = [
        *lab.get("pods", "--all-namespaces", part_of)["items"],
        *lab.get("deployments", "--all-namespaces", part_of)["items"],
        *lab.get("peernodes")["items"],
    ]
    return [f"{o['kind']} {o['metadata']['name']}" for o in found]


# --- helpers ----------------------------------------------------------------------------------


def _processes_under(workdir: Path) -> list[str]:
    """Command lines that name `workdir` (the node's containerd, kubelet and shims do)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in text:
            found.append(text)
    return found


def _ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in pod.get("status", {}).get("conditions", [])
    ) and not pod["metadata"].get("deletionTimestamp")


def _peer_condition(lab: HomeLab, name: str, type_: str) -> str | None:
    peers = lab.get("peernodes", "--field-selector", f"metadata.name={name}")["items"]
    conditions = peers[0].get("status", {}).get("conditions", []) if peers else []
    return next((c["status"] for c in conditions if c["type"] == type_), None)


def _ready_pool_peers(lab: HomeLab, pool: str) -> set[str]:
    peers = lab.get("peernodes", "-l", f"edgellm.io/worker-pool={pool}")["items"]
    return {
        p["metadata"]["name"]
        for p in peers
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p.get("status", {}).get("conditions", [])
        )
    }


def _finished(lab: HomeLab, name: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = lab.get("inferencerequest", name, "--namespace=default")
        phase = body.get("status", {}).get("phase")
        return body if phase in ("Succeeded", "Failed", "Cancelled") else None

    return eventually(finished, 180, f"the InferenceRequest {name} finishes")


def _running_with_output(lab: HomeLab, name: str) -> dict[str, Any] | None:
    status: dict[str, Any] = lab.get("inferencerequest", name, "--namespace=default").get(
        "status", {}
    )
    tokens = (status.get("output") or {}).get("completionTokens", 0)
    return status if status.get("phase") == "Running" and tokens > 0 else None


def _events(lab: HomeLab, name: str) -> list[dict[str, Any]]:
    selector = f"involvedObject.name={name}"
    items: list[dict[str, Any]] = lab.get(
        "events", "--namespace=default", "--field-selector", selector
    )["items"]
    return items


def _operator_leading(lab: HomeLab, pod: str) -> float:
    """edgellm_operator_leading on the pod's /metrics, through the kube-apiserver's proxy."""
    metrics = lab.kubectl(
        "get", "--raw", f"/api/v1/namespaces/{SYSTEM}/pods/{pod}:9090/proxy/metrics"
    )
    match = re.search(r"^edgellm_operator_leading (\S+)$", metrics, re.MULTILINE)
    assert match, f"{pod} exports no edgellm_operator_leading"
    return float(match.group(1))


def _ask(client: OpenAI, model: str) -> Any:
    try:
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello?"}], max_tokens=8
        )
    except Exception:  # a 401 until the router has read the key, a 503 until it has the peer
        return None


@contextmanager
def _port_forward(lab: HomeLab, target: str, port: int) -> Iterator[str]:
    """`kubectl port-forward` to `target` on a free local port; its URL once it answers."""
    process = subprocess.Popen(
        [str(tool("kubectl")), "port-forward", f"--namespace={SYSTEM}", target, f":{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "KUBECONFIG": str(lab.kubeconfig)},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # Forwarding from 127.0.0.1:NNNNN -> 8080
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"kubectl port-forward said: {line}"
        url = f"http://127.0.0.1:{match.group(1)}"
        eventually(lambda: answers(url), 30, f"{target} answers through the port-forward")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
