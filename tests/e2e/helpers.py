"""What the end-to-end tests share besides their fixtures (`conftest.py`): real processes
(`edgellm worker`, `router`, `operator`, `join`) on free loopback ports, kubectl, manifests, and
`eventually`, the one way a test waits: on a condition, with a deadline.
"""

import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from kubernetes import client

from edgellm.api import KINDS, custom_resource_definition
from edgellm.dev.cluster import LocalCluster, free_port
from edgellm.dev.federation import LocalFederation
from edgellm.dev.tools import tool
from edgellm.federation.rbac import federation_manifests
from edgellm.kube import APIError, api_client, apply, install_crds, objects
from edgellm.kube.objects import PEER_NODES

T = TypeVar("T")


def prepare_cluster(cluster: LocalCluster, *crds: dict[str, Any]) -> None:
    """Installs EdgeLLM's CRDs, then `crds`, and the federation's roles."""
    with api_client(cluster.kubeconfig("admin")) as api:
        install_crds(api, [*(custom_resource_definition(k) for k in KINDS), *crds])
        apply(api, federation_manifests(cluster.name))


def kubectl(
    kubeconfig: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the pinned kubectl; the caller checks returncode and output."""
    return subprocess.run(
        [str(tool("kubectl")), f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def manifest(kind: str, spec: dict[str, Any], name: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if kind == "InferenceRequest":
        metadata["namespace"] = "default"
    return {"apiVersion": "edgellm.io/v1alpha1", "kind": kind, "metadata": metadata, "spec": spec}


def output_text(kubeconfig: dict[str, Any], namespace: str, status: dict[str, Any]) -> str:
    """A request's output so far, from its status or from the ConfigMap it names."""
    output = status.get("output") or {}
    if "configMapRef" not in output:
        return str(output.get("text", ""))
    ref = output["configMapRef"]
    with api_client(kubeconfig) as api:
        found = client.CoreV1Api(api).read_namespaced_config_map(ref["name"], namespace)
    return str(found.data[ref["key"]])


def peer_ready(kubeconfig: dict[str, Any], name: str) -> bool:
    """Whether the cluster of `kubeconfig` has the PeerNode `name`, Ready."""
    with api_client(kubeconfig) as api:
        try:
            body = objects.get(api, PEER_NODES, name)
        except APIError:
            return False
    conditions = body.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def create_fresh_peer(peers: client.CustomObjectsApi, name: str, spec: dict[str, Any]) -> None:
    """A PeerNode with one heartbeat, as `edgellm join` writes it, and no process behind it: its
    `heartbeatTTLSeconds` says how long the operator keeps it Ready."""
    api = peers.api_client
    objects.create(api, PEER_NODES, manifest("PeerNode", spec, name))
    objects.patch_status(
        api, PEER_NODES, name, {"lastHeartbeatTime": datetime.now(UTC).isoformat()}
    )


def request_events(federation: LocalFederation, name: str) -> list[Any]:
    """The Events of an InferenceRequest in the first cluster's default namespace."""
    with api_client(federation.clusters[0].kubeconfig("admin")) as api:
        selector = f"involvedObject.name={name}"
        return list(
            client.CoreV1Api(api).list_namespaced_event("default", field_selector=selector).items
        )


def eventually(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Polls `check` until it returns something truthy, or fails saying what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"within {timeout:.0f}s: {what}")
        time.sleep(0.2)


def edgellm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgellm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class OperatorProcess:
    """`edgellm operator` for one cluster, with fast intervals for tests, and `options`."""

    cluster: str
    kubeconfig: Path
    log: Path
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    options: tuple[str, ...] = ()

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edgellm",
                    "operator",
                    f"--cluster={self.cluster}",
                    f"--kubeconfig={self.kubeconfig}",
                    "--peer-removal-grace=8",
                    "--sync-interval=1",
                    "--pool-interval=1",
                    "--inline-output-limit=4096",
                    f"--metrics-port={self.metrics_port}",
                    *self.options,
                    "--verbose",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Worker:
    url: str
    process: subprocess.Popen[bytes]


def answers(url: str) -> bool:
    """Whether the server at `url` answers its /healthz."""
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def worker_process(model: Path, *options: str) -> Iterator[Worker]:
    """`edgellm worker` serving `model` on a free loopback port, once it answers /healthz."""
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgellm", "worker"),
            *(f"--model={model}", f"--port={port}", *options),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: answers(url), 60, f"the worker for {model.name} answers /healthz")
        yield Worker(url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def routed_peers(url: str) -> int:
    """How many peers the router at `url` routes to; 0 while it does not answer."""
    try:
        return int(httpx.get(f"{url}/healthz", timeout=2).json()["peers"])
    except (httpx.HTTPError, ValueError):
        return 0


@contextmanager
def router_process(kubeconfig: Path | None, log: Path, *options: str) -> Iterator[str]:
    """`edgellm router` over kubeconfig's cluster (edge-1), or without a cluster (`options`
    then say --anonymous and --peers-file), on a free port, once it answers /healthz; its URL.
    Its log is printed at the end."""
    port = free_port()
    cluster = [] if kubeconfig is None else [f"--kubeconfig={kubeconfig}", "--cluster=edge-1"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "edgellm", "router", *cluster),
                *(f"--port={port}", "--peer-refresh=1", "--verbose"),
                *options,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: answers(url), 60, "the router answers /healthz")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        print(log.read_text()[-4000:])


@dataclass
class ServingPeer:
    name: str
    worker: Worker


@contextmanager
def serving_peer(
    kubeconfig: Path,
    name: str,
    model: Path,
    kv_events: bool = False,
    worker_options: Sequence[str] = (),
    join_options: Sequence[str] = (),
) -> Iterator[ServingPeer]:
    """A worker serving `model`, joined as the peer `name` of kubeconfig's cluster, once it is
    Ready there; it leaves at the end. With `kv_events`, it publishes them and says where."""
    port = free_port()
    publish = [f"--kv-events=tcp://*:{port}"] if kv_events else []
    advertise = [f"--kv-events=tcp://127.0.0.1:{port}"] if kv_events else []
    with (
        worker_process(model, *publish, *worker_options) as worker,
        joined_peer(kubeconfig, name, worker.url, model.parent, *advertise, *join_options),
    ):
        yield ServingPeer(name, worker)


@contextmanager
def joined_peer(
    kubeconfig: Path, name: str, endpoint: str, models_dir: Path, *options: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`edgellm join` of the peer `name`, once it is Ready (the process, which heartbeats until
    stopped); it leaves at the end."""
    with tempfile.TemporaryFile() as log:
        join = subprocess.Popen(
            [
                *(sys.executable, "-m", "edgellm", "join", f"--kubeconfig={kubeconfig}"),
                f"--name={name}",
                f"--endpoint={endpoint}",
                f"--models-dir={models_dir}",
                *options,
                "--verbose",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        config = yaml.safe_load(kubeconfig.read_text())
        try:
            try:
                eventually(lambda: peer_ready(config, name), 120, f"the peer {name} is Ready")
            except pytest.fail.Exception:
                log.seek(0)
                print(f"--- edgellm join {name} ---\n{log.read().decode(errors='replace')[-4000:]}")
                raise
            yield join
        finally:
            join.terminate()
            join.wait(timeout=30)
            edgellm("leave", f"--kubeconfig={kubeconfig}", f"--name={name}", "--deadline=0")


class TcpRelay:
    """A loopback relay to `target` (host, port) that a test can cut and restore, as a network
    partition would, without touching the server behind it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def restore(self) -> None:
        """Relays again, on the same port."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuses new connections and breaks every open one."""
        assert self._listener is not None
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
        with self._lock:
            for connection in self._open:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                near, _ = listener.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(self.target)
            except OSError:
                near.close()
                continue
            with self._lock:
                self._open += [near, far]
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
