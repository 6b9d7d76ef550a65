"""One local Kubernetes control plane made of real processes on loopback.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the KWOK controller (which plays
the kubelets of a few fake nodes, one with a GPU). Every component has its own certificate
identity and RBAC applies. The processes run in their own sessions, so they outlive
`edgellm dev up`; their pids and ports are kept in `<root>/cluster.json` for `edgellm dev down`.
Called by `federation.py` (several clusters) and, through it, by the CLI and the e2e fixtures.
"""

import base64
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from kubernetes import client
from pydantic import BaseModel

from edgellm.dev import pki
from edgellm.dev.errors import ClusterStateError, ComponentFailedError, StartCancelledError
from edgellm.dev.tools import tool
from edgellm.kube import api_client

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
SERVICE_CIDR = "10.96.0.0/16"
KWOK_NODE_ANNOTATION = {"kwok.x-k8s.io/node": "fake"}
STOP_GRACE_SECONDS = 10.0


class ClusterState(BaseModel):
    """What `dev down` and the tests need to find a running cluster again."""

    name: str
    ports: dict[str, int]
    pids: dict[str, int] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class FakeNode:
    name: str
    cpu: str
    memory: str
    gpus: int = 0
    gpu_product: str = ""
    gpu_memory_mib: int = 0

    def manifest(self) -> dict[str, Any]:
        labels = {
            "type": "kwok",
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "edgellm.io/peer": "true",
        }
        allocatable = {"cpu": self.cpu, "memory": self.memory, "pods": "110"}
        if self.gpus:
            # The labels NVIDIA's GPU feature discovery puts on a real GPU node.
            labels |= {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": self.gpu_product,
                "nvidia.com/gpu.memory": str(self.gpu_memory_mib),
                "nvidia.com/gpu.count": str(self.gpus),
            }
            allocatable["nvidia.com/gpu"] = str(self.gpus)
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels, "annotations": KWOK_NODE_ANNOTATION},
            "spec": {},
            "status": {
                "allocatable": allocatable,
                "capacity": allocatable,
                # Every field a kubelet reports; typed clients refuse a Node without them.
                "nodeInfo": {
                    "architecture": "amd64",
                    "operatingSystem": "linux",
                    "osImage": "kwok",
                    "kernelVersion": "kwok",
                    "kubeletVersion": "kwok",
                    "kubeProxyVersion": "kwok",
                    "containerRuntimeVersion": "kwok",
                    "machineID": self.name,
                    "systemUUID": self.name,
                    "bootID": self.name,
                },
            },
        }


def default_nodes(cluster: str) -> list[FakeNode]:
    return [
        FakeNode(f"{cluster}-cpu-0", cpu="8", memory="32Gi"),
        FakeNode(f"{cluster}-cpu-1", cpu="4", memory="16Gi"),
        FakeNode(
            f"{cluster}-gpu-0",
            cpu="16",
            memory="64Gi",
            gpus=1,
            gpu_product="NVIDIA-GeForce-RTX-4090",
            gpu_memory_mib=24564,
        ),
    ]


class LocalCluster:
    """A control plane rooted at `root`: certificates, data, logs, kubeconfigs and state."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.pki_dir = root / "pki"
        self.log_dir = root / "logs"
        self.state_file = root / "cluster.json"

    # --- state ---------------------------------------------------------------------------

    def load_state(self) -> ClusterState:
        try:
            return ClusterState.model_validate_json(self.state_file.read_text())
        except (OSError, ValueError) as e:
            raise ClusterStateError(f"no local cluster state in {self.state_file}: {e}") from e

    def _save_state(self, state: ClusterState) -> None:
        self.state_file.write_text(state.model_dump_json(indent=2))

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.load_state().ports['kube-apiserver']}"

    def log(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    # --- bring-up --------------------------------------------------------------------------

    def up(
        self,
        timeout: float,
        cancelled: Callable[[], bool] = lambda: False,
        progress: Callable[[str], None] = lambda _: None,
    ) -> None:
        """Starts every component from fresh data and waits until the fake nodes are Ready.

        On any failure the components already started are stopped and the error says which
        component failed and where its log is."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.log_dir.mkdir(exist_ok=True)
        state = ClusterState(
            name=self.name,
            ports={c: free_port() for c in (*COMPONENTS, "etcd-peer")},
        )
        self._save_state(state)
        self._write_pki()
        started = time.monotonic()
        deadline = started + timeout
        try:
            for component in COMPONENTS:
                self._start(component, state)
                self._wait_healthy(component, state, deadline, cancelled)
                progress(f"{self.name}: {component} ready ({time.monotonic() - started:.1f}s)")
            self._create_nodes()
            self._wait_nodes_ready(deadline, cancelled)
            progress(f"{self.name}: fake nodes Ready ({time.monotonic() - started:.1f}s)")
        except BaseException:
            self.down()
            raise

    def _write_pki(self) -> None:
        ca = pki.CertificateAuthority(f"edgellm-dev-{self.name}")
        pki.write_pair(ca.pair, self.pki_dir, "ca")
        pki.write_pair(pki.service_account_key(), self.pki_dir, "sa")
        serving = ("127.0.0.1", "localhost", "kubernetes", "kubernetes.default.svc", "10.96.0.1")
        pki.write_pair(ca.issue("kube-apiserver", server_names=serving), self.pki_dir, "apiserver")
        for component in ("kube-controller-manager", "kube-scheduler"):
            pki.write_pair(
                ca.issue(component, server_names=("127.0.0.1", "localhost")),
                self.pki_dir,
                f"{component}-serving",
            )
        identities = {
            "admin": ("edgellm-admin", ("system:masters",)),
            # EdgeLLM's operator, as the chart's ServiceAccount would be (see federation/rbac).
            "operator": ("edgellm-operator", ("system:masters", "edgellm:operators")),
            "kube-controller-manager": ("system:kube-controller-manager", ()),
            "kube-scheduler": ("system:kube-scheduler", ()),
            # KWOK stands in for every kubelet and node lifecycle; it needs cluster-wide writes.
            "kwok": ("kwok-controller", ("system:masters",)),
        }
        for user, (common_name, groups) in identities.items():
            pair = ca.issue(common_name, groups)
            pki.write_pair(pair, self.pki_dir, user)

    def kubeconfig(self, user: str, server: str | None = None) -> dict[str, Any]:
        """A single-context kubeconfig for one of the cluster's identities."""

        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": self.name,
                    "cluster": {
                        "server": server or self.server,
                        "certificate-authority-data": b64(self.pki_dir / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": f"{self.name}-{user}",
                    "user": {
                        "client-certificate-data": b64(self.pki_dir / f"{user}.crt"),
                        "client-key-data": b64(self.pki_dir / f"{user}.key"),
                    },
                }
            ],
            "contexts": [
                {
                    "name": self.name,
                    "context": {"cluster": self.name, "user": f"{self.name}-{user}"},
                }
            ],
            "current-context": self.name,
        }

    def _kubeconfig_file(self, user: str, state: ClusterState) -> Path:
        path = self.root / f"{user}.kubeconfig"
        server = f"https://127.0.0.1:{state.ports['kube-apiserver']}"
        path.write_text(yaml.safe_dump(self.kubeconfig(user, server)))
        path.chmod(0o600)
        return path

    def _command(self, component: str, state: ClusterState) -> list[str]:
        p, d = state.ports, self.pki_dir
        etcd_url = f"http://127.0.0.1:{p['etcd']}"
        if component == "etcd":
            peer_url = f"http://127.0.0.1:{p['etcd-peer']}"
            return [
                str(tool("etcd")),
                f"--name={self.name}",
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster={self.name}={peer_url}",
                "--log-level=warn",
                # A throwaway development store: durability is not worth the fsync latency.
                "--unsafe-no-fsync",
                "--quota-backend-bytes=1073741824",
            ]
        if component == "kube-apiserver":
            return [
                str(tool("kube-apiserver")),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={p['kube-apiserver']}",
                f"--tls-cert-file={d / 'apiserver.crt'}",
                f"--tls-private-key-file={d / 'apiserver.key'}",
                f"--client-ca-file={d / 'ca.crt'}",
                f"--service-account-key-file={d / 'sa.crt'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                # Endpoints may not hold loopback addresses, and nothing routes to this one.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ]
        if component in ("kube-controller-manager", "kube-scheduler"):
            kubeconfig = self._kubeconfig_file(component, state)
            common = [
                str(tool(component)),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p[component]}",
                f"--tls-cert-file={d / f'{component}-serving.crt'}",
                f"--tls-private-key-file={d / f'{component}-serving.key'}",
                "--leader-elect=false",
            ]
            if component == "kube-scheduler":
                return common
            return [
                *common,
                f"--service-account-private-key-file={d / 'sa.key'}",
                f"--root-ca-file={d / 'ca.crt'}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={d / 'ca.crt'}",
                f"--cluster-signing-key-file={d / 'ca.key'}",
            ]
        if component == "kwok":
            return [
                str(tool("kwok")),
                f"--config={tool('kwok-stages.yaml')}",
                f"--kubeconfig={self._kubeconfig_file('kwok', state)}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--server-address=127.0.0.1:{p['kwok']}",
                "--node-lease-duration-seconds=40",
            ]
        raise ValueError(f"unknown component {component}")

    def _start(self, component: str, state: ClusterState) -> None:
        command = self._command(component, state)
        with self.log(component).open("ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                # Its own session: Ctrl-C on `dev up` does not reach it, and it outlives us.
                start_new_session=True,
                env={**os.environ, "HOME": str(self.root)},
            )
        state.pids[component] = process.pid
        self._save_state(state)

    def _health_url(self, component: str, state: ClusterState) -> str:
        port = state.ports[component]
        if component == "etcd":
            return f"http://127.0.0.1:{port}/health"
        if component == "kwok":
            return f"http://127.0.0.1:{port}/healthz"
        return (
            f"https://127.0.0.1:{port}/{'readyz' if component == 'kube-apiserver' else 'healthz'}"
        )

    def client_ssl_context(self, user: str = "admin") -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.pki_dir / "ca.crt")
        context.load_cert_chain(self.pki_dir / f"{user}.crt", self.pki_dir / f"{user}.key")
        return context

    def _wait_healthy(
        self, component: str, state: ClusterState, deadline: float, cancelled: Callable[[], bool]
    ) -> None:
        url = self._health_url(component, state)
        pid = state.pids[component]
        with httpx.Client(verify=self.client_ssl_context(), timeout=2.0) as client:
            while True:
                if cancelled():
                    raise StartCancelledError(f"{self.name}: start of {component} was cancelled")
                if not _alive(pid):
                    raise ComponentFailedError(
                        self.name, component, "exited during start", self.log(component)
                    )
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ComponentFailedError(
                        self.name,
                        component,
                        f"was not healthy at {url} in time",
                        self.log(component),
                    )
                time.sleep(0.2)

    def _create_nodes(self) -> None:
        with api_client(self.kubeconfig("admin")) as api:
            core = client.CoreV1Api(api)
            for node in default_nodes(self.name):
                core.create_node(node.manifest())

    def _wait_nodes_ready(self, deadline: float, cancelled: Callable[[], bool]) -> None:
        with api_client(self.kubeconfig("admin")) as api:
            core = client.CoreV1Api(api)
            while True:
                nodes = core.list_node().items
                ready = [
                    n
                    for n in nodes
                    if any(
                        c.type == "Ready" and c.status == "True" for c in n.status.conditions or []
                    )
                ]
                if nodes and len(ready) == len(nodes):
                    return
                if cancelled():
                    raise StartCancelledError(f"{self.name}: start was cancelled")
                if time.monotonic() > deadline:
                    raise ComponentFailedError(
                        self.name,
                        "kwok",
                        "did not make the fake nodes Ready in time",
                        self.log("kwok"),
                    )
                time.sleep(0.3)

    # --- teardown --------------------------------------------------------------------------

    def down(self) -> None:
        """Stops every component still running, the last started first."""
        try:
            state = self.load_state()
        except ClusterStateError:
            return
        for component in reversed(COMPONENTS):
            pid = state.pids.get(component)
            if pid is not None and _is_component(pid, component):
                _terminate(pid)

    def stop_component(self, component: str) -> None:
        """Stops one component, as a crash or a partition would (fault tests use this)."""
        pid = self.load_state().pids[component]
        if _is_component(pid, component):
            _terminate(pid)

    def start_component(self, component: str, timeout: float = 120.0) -> None:
        """Starts a stopped component again, on the same port and data."""
        state = self.load_state()
        self._start(component, state)
        self._wait_healthy(component, state, time.monotonic() + timeout, lambda: False)

    def running_pids(self) -> dict[str, int]:
        state = self.load_state()
        return {c: pid for c, pid in state.pids.items() if _is_component(pid, c)}

    def memory_mib(self) -> dict[str, float]:
        """Resident memory of each running component, in MiB."""
        return {c: _rss_kib(pid) / 1024 for c, pid in self.running_pids().items()}


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass  # not our child (started by an earlier `dev up`): ask the kernel instead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _is_zombie(pid)


def process_usage(pid: int) -> tuple[float, float]:
    """(resident memory in MiB, CPU seconds so far) of a process, for benchmarks' figures."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return _rss_kib(pid) / 1024, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _is_component(pid: int, component: str) -> bool:
    """Guards against pid reuse: only signal a process that still runs the component's binary."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except OSError:
        return False
    return Path(argv0).name == component and _alive(pid)


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while _alive(pid):
        time.sleep(0.05)
