"""A model too large for any one peer, served across peers: a leading worker holds the weights
and the first layers, `edgellm stage` peers (llama.cpp's RPC servers) the rest. Real operators,
real llama.cpp workers and RPC servers, peers that declare less memory than the model takes."""

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from kubernetes import client

from edgellm.api import GROUP, VERSION
from edgellm.api.peernode import LocalModel
from edgellm.dev.cluster import free_port
from edgellm.dev.federation import LocalFederation
from edgellm.kube import api_client
from edgellm.scheduling.layersplit import layer_bytes, split_context
from edgellm.worker.hardware import gguf_shape
from edgellm.worker.models import BENCH, TINY, write_model
from tests.e2e.helpers import (
    OperatorProcess,
    eventually,
    joined_peer,
    output_text,
    request_events,
    routed_peers,
    router_process,
    serving_peer,
    worker_process,
)

DONE = 300.0
PROMPT = "Once upon a time, in a federation of small machines,"
LONG_TOKENS = 600  # the largest request here: peers' memory is sized for its context


@dataclass
class Stage:
    name: str
    process: subprocess.Popen[bytes]


@dataclass
class Split:
    model: Path
    leader: str
    stages: dict[str, Stage]
    memory: dict[str, int]  # what each peer declares, bytes


@pytest.fixture(scope="module")
def split_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A name of its own, so that no other test's peer holds it whole.
    return write_model(tmp_path_factory.mktemp("split-models") / "split-random.gguf", BENCH)


@contextmanager
def _stage(kubeconfig: Path, name: str, memory: int, empty: Path) -> Iterator[Stage]:
    rpc_port, health_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgellm", "stage", "--threads=1"),
            f"--port={rpc_port}",
            f"--health-port={health_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with joined_peer(
            kubeconfig,
            name,
            f"http://127.0.0.1:{health_port}",
            empty,
            f"--rpc-server=127.0.0.1:{rpc_port}",
            f"--memory={memory}",
        ):
            yield Stage(name, process)
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def split(
    joined: LocalFederation,
    operators: dict[str, OperatorProcess],
    cluster_kubeconfigs: dict[str, Path],
    split_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Split]:
    """A leader with room for 2 of the model's 8 layers, and three stages with room for 3."""
    layers, kv_per_token = gguf_shape(split_model)
    shape = LocalModel(
        name="split-random",
        size_bytes=split_model.stat().st_size,
        layers=layers,
        kv_bytes_per_token=kv_per_token,
    )
    per_layer = layer_bytes(shape, split_context(len(PROMPT) // 4, LONG_TOKENS))
    assert per_layer is not None
    kubeconfig = cluster_kubeconfigs["edge-1"]
    empty = tmp_path_factory.mktemp("no-models")
    memory = {"split-leader": 2 * per_layer + 1024}
    memory |= {f"split-stage-{i}": 3 * per_layer + 1024 for i in range(3)}
    with ExitStack() as stack:
        stack.enter_context(
            serving_peer(
                kubeconfig,
                "split-leader",
                split_model,
                worker_options=["--split", "--threads=1"],
                join_options=[f"--memory={memory['split-leader']}"],
            )
        )
        stages = {
            name: stack.enter_context(_stage(kubeconfig, name, memory[name], empty))
            for name in memory
            if name != "split-leader"
        }
        yield Split(split_model, "split-leader", stages, memory)


@contextmanager
def _objects(joined: LocalFederation) -> Iterator[client.CustomObjectsApi]:
    with api_client(joined.clusters[0].kubeconfig("admin")) as api:
        yield client.CustomObjectsApi(api)


def _submit(joined: LocalFederation, name: str, sampling: dict[str, Any]) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceRequest",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"model": "split-random", "prompt": PROMPT, "sampling": sampling},
    }
    with _objects(joined) as objects:
        objects.create_namespaced_custom_object(
            GROUP, VERSION, "default", "inferencerequests", body
        )


def _status(joined: LocalFederation, name: str) -> dict[str, Any]:
    with _objects(joined) as objects:
        body = objects.get_namespaced_custom_object(
            GROUP, VERSION, "default", "inferencerequests", name
        )
    status: dict[str, Any] = body.get("status", {})
    return status


def _finished(joined: LocalFederation, name: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        status = _status(joined, name)
        return status if status.get("phase") in ("Succeeded", "Failed", "Cancelled") else None

    return eventually(check, DONE, f"{name} finishes")


def _whole_model_text(model: Path, sampling: dict[str, Any]) -> str:
    """What one unrestricted peer, holding the whole model, generates."""
    with worker_process(model, "--threads=1") as worker:
        body = {
            "model": "split-random",
            "prompt": PROMPT,
            "max_tokens": sampling["maxTokens"],
            "temperature": sampling["temperature"],
            "ignore_eos": sampling["ignoreEos"],
        }
        response = httpx.post(f"{worker.url}/v1/completions", json=body, timeout=DONE)
    response.raise_for_status()
    return str(response.json()["choices"][0]["text"])


def test_a_model_larger_than_any_peer_runs_across_peers_as_on_one(
    joined: LocalFederation, split: Split
) -> None:
    model_bytes = split.model.stat().st_size
    assert all(memory < model_bytes for memory in split.memory.values())
    sampling = {"maxTokens": 48, "temperature": 0, "ignoreEos": True}
    _submit(joined, "split-greedy", sampling)
    status = _finished(joined, "split-greedy")
    assert status["phase"] == "Succeeded", status["conditions"]

    stages = status["assignment"]["stages"]
    assert stages[0]["peer"] == split.leader == status["assignment"]["decodePeer"]
    assert len(stages) == 3  # the leader's 2 layers and two stages' 3 each
    covered = [layer for s in stages for layer in range(s["firstLayer"], s["lastLayer"] + 1)]
    assert covered == list(range(8))
    assert [s["lastLayer"] - s["firstLayer"] + 1 for s in stages] == [2, 3, 3]
    events = request_events(joined, "split-greedy")
    assert any("split across peers" in e.message for e in events if e.reason == "PeerChosen")

    text = output_text(joined.clusters[0].kubeconfig("admin"), "default", status)
    assert status["output"]["completionTokens"] == 48
    assert text == _whole_model_text(split.model, sampling)


def test_the_router_serves_a_split_model_through_the_openai_client(
    split: Split, cluster_kubeconfigs: dict[str, Path], tmp_path: Path
) -> None:
    sampling = {"maxTokens": 32, "temperature": 0, "ignoreEos": True}
    expected = _whole_model_text(split.model, sampling)
    with router_process(
        cluster_kubeconfigs["edge-1"], tmp_path / "router.log", "--anonymous"
    ) as url:
        eventually(
            lambda: routed_peers(url) >= 1 + len(split.stages),
            60,
            "the router lists the leader and the stages",
        )
        answer = openai.OpenAI(base_url=f"{url}/v1", api_key="none").completions.create(
            model="split-random",
            prompt=PROMPT,
            max_tokens=32,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    assert answer.choices[0].text == expected
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 32


def test_a_stage_lost_mid_request_is_planned_around_and_the_request_resumes(
    joined: LocalFederation, split: Split
) -> None:
    _submit(joined, "split-lost", {"maxTokens": LONG_TOKENS, "temperature": 0, "ignoreEos": True})

    def generating() -> dict[str, Any] | None:
        status = _status(joined, "split-lost")
        done = (status.get("output") or {}).get("completionTokens", 0)
        return status if status.get("phase") == "Running" and done >= 20 else None

    first = eventually(generating, DONE, "the split request has generated 20 tokens")
    victim = first["assignment"]["stages"][-1]["peer"]
    split.stages[victim].process.send_signal(signal.SIGKILL)

    status = _finished(joined, "split-lost")
    assert status["phase"] == "Succeeded", status["conditions"]
    assert status["output"]["completionTokens"] == LONG_TOKENS
    assert status["assignment"]["attempts"] >= 2
    peers = [s["peer"] for s in status["assignment"]["stages"]]
    assert victim not in peers
    assert sum(s["lastLayer"] - s["firstLayer"] + 1 for s in status["assignment"]["stages"]) == 8
    lost = [e.message for e in request_events(joined, "split-lost") if e.reason == "StageLost"]
    assert lost
    assert victim in lost[0]


def test_a_model_too_large_for_the_federation_is_refused_with_a_clear_reason(
    joined: LocalFederation, split: Split
) -> None:
    # 4,000 tokens of context take 32 MiB of KV: more than the peers' memory leaves.
    _submit(joined, "split-too-large", {"maxTokens": 4000})
    status = _finished(joined, "split-too-large")
    assert status["phase"] == "Failed"
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["reason"] == "ModelTooLarge"
    assert "cannot hold 'split-random'" in complete["message"]
    assert "short" in complete["message"]
    warnings = [e for e in request_events(joined, "split-too-large") if e.type == "Warning"]
    assert any(e.reason == "ModelTooLarge" for e in warnings)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny") / "tiny-random.gguf", TINY)


def test_plans_go_to_split_leaders_only_and_leaders_need_one(tiny_model: Path) -> None:
    plan = {
        "context": 512,
        "leader_layers": 1,
        "stages": [{"endpoint": "127.0.0.1:1", "layers": 1}],
    }
    hi = {"model": "tiny-random", "prompt": "hi"}
    with worker_process(tiny_model) as whole, worker_process(tiny_model, "--split") as leader:
        refused = httpx.post(f"{whole.url}/v1/completions", json={**hi, "split": plan})
        assert refused.status_code == 400
        assert "started with --split" in refused.json()["error"]["message"]
        planless = httpx.post(f"{leader.url}/v1/completions", json=hi)
        assert planless.status_code == 400
        assert "needs its split plan" in planless.json()["error"]["message"]


def test_a_leader_names_the_stage_it_cannot_reach(tiny_model: Path) -> None:
    gone = f"127.0.0.1:{free_port()}"
    plan = {"context": 512, "leader_layers": 1, "stages": [{"endpoint": gone, "layers": 1}]}
    body = {"model": "tiny-random", "prompt": "hi", "split": plan}
    with worker_process(tiny_model, "--split") as leader:
        response = httpx.post(f"{leader.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert error["lost_stages"] == [gone]
