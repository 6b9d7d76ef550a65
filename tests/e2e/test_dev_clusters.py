"""`edgellm dev up/down`: real control planes come up, and nothing is left behind, also when a
component fails to start or the user presses Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from edgellm.dev.federation import LocalFederation
from edgellm.dev.tools import CACHE_ENV, cache_dir
from edgellm.kube import api_client

EDGELLM = [sys.executable, "-m", "edgellm"]


def _recorded_pids(workdir: Path) -> list[int]:
    return [
        pid
        for state in workdir.glob("*/cluster.json")
        for pid in json.loads(state.read_text())["pids"].values()
    ]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_until_all_stopped(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "dev"
    LocalFederation(tmp_path / "dev").down()  # never leak processes, whatever the test did


def test_every_cluster_has_ready_fake_nodes_one_with_a_gpu(federation: LocalFederation) -> None:
    for cluster in federation.clusters:
        with api_client(cluster.kubeconfig("admin")) as api:
            nodes = client.CoreV1Api(api).list_node().items
        assert len(nodes) == 3
        for node in nodes:
            ready = [c for c in node.status.conditions if c.type == "Ready"]
            assert ready[0].status == "True", node.metadata.name
        gpus = [n for n in nodes if n.status.allocatable.get("nvidia.com/gpu") == "1"]
        assert [n.metadata.labels["nvidia.com/gpu.product"] for n in gpus] == [
            "NVIDIA-GeForce-RTX-4090"
        ]


def test_clusters_are_independent_and_enforce_rbac(federation: LocalFederation) -> None:
    first, second = federation.clusters[:2]
    with api_client(first.kubeconfig("admin")) as api:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": "only-in-first"}})
    with api_client(second.kubeconfig("admin")) as api:
        names = [n.metadata.name for n in client.CoreV1Api(api).list_namespace().items]
    assert "only-in-first" not in names
    # The scheduler's identity may read pods but not delete namespaces: RBAC is on.
    with (
        api_client(first.kubeconfig("kube-scheduler")) as api,
        pytest.raises(client.ApiException) as caught,
    ):
        client.CoreV1Api(api).delete_namespace("only-in-first")
    assert caught.value.status == 403


def test_up_status_and_down_through_the_cli(workdir: Path) -> None:
    up = subprocess.run(
        [*EDGELLM, "dev", "up", "--clusters", "1", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert up.returncode == 0, up.stderr
    assert f"export KUBECONFIG={workdir / 'kubeconfig'}" in up.stdout
    assert "edge-1: CRDs installed, federation initialised" in up.stdout
    status = subprocess.run(
        [*EDGELLM, "dev", "status", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for component in (
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
    ):
        assert f"    {component}: " in status.stdout
    assert "  memory: " in status.stdout
    pids = _recorded_pids(workdir)
    assert len(pids) == 5
    down = subprocess.run(
        [*EDGELLM, "dev", "down", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert down.returncode == 0, down.stderr
    assert _wait_until_all_stopped(pids) == []


def test_a_component_that_fails_to_start_is_named_with_its_log_and_nothing_is_left(
    workdir: Path, tmp_path: Path
) -> None:
    broken_cache = tmp_path / "cache"
    (broken_cache / "bin").mkdir(parents=True)
    for binary in (cache_dir() / "bin").iterdir():
        (broken_cache / "bin" / binary.name).symlink_to(binary)
    scheduler = broken_cache / "bin" / "kube-scheduler"
    scheduler.unlink()
    scheduler.write_text("#!/bin/sh\necho 'E0101 unknown flag: --frobnicate' >&2\nexit 3\n")
    scheduler.chmod(0o755)

    up = subprocess.run(
        [*EDGELLM, "dev", "up", "--clusters", "2", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, CACHE_ENV: str(broken_cache)},
    )
    assert up.returncode == 1
    assert "kube-scheduler exited during start" in up.stderr
    assert "unknown flag: --frobnicate" in up.stderr, "the log tail is shown"
    assert _wait_until_all_stopped(_recorded_pids(workdir)) == []


def test_ctrl_c_during_up_stops_everything_already_started(workdir: Path) -> None:
    process = subprocess.Popen(
        [*EDGELLM, "dev", "up", "--clusters", "2", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    for line in process.stdout:
        if "kube-apiserver ready" in line:
            break
    else:
        pytest.fail(f"dev up ended before an apiserver was ready: {process.stderr}")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) != 0
    pids = _recorded_pids(workdir)
    assert pids, "some components had started"
    assert _wait_until_all_stopped(pids) == []
