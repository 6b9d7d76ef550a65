"""One local Kubernetes control plane made of real processes on loopback.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the KWOK controller (which plays
the kubelets of a few fake nodes, one with a GPU), and, when asked, a real node whose pods run
(`node.py`). Every component has its own certificate identity and RBAC applies. The processes
run in their own sessions, so they outlive `edgellm dev up`; their pids and ports are kept in
`<root>/cluster.json` for `edgellm dev down`. Called by `federation.py` (several clusters) and,
through it, by the CLI and the e2e fixtures.
"""

import base64
import os
import shutil
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from kubernetes import client
from pydantic import BaseModel

from edgellm.api import NODE_PEER_LABEL
from edgellm.dev import pki
from edgellm.dev.errors import ClusterStateError, ComponentFailedError, StartCancelledError
from edgellm.dev.node import FAKE_NODE_TAINT, NODE_COMPONENTS, NodeNetwork, RealNode
from edgellm.dev.processes import alive, rss_kib, runs, spawn, terminate
from edgellm.dev.tools import tool
from edgellm.kube import api_client

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
SERVICE_CIDR = "10.96.0.0/16"
KWOK_NODE_ANNOTATION = {"kwok.x-k8s.io/node": "fake"}


class ClusterState(BaseModel):
    """What `dev down` and the tests need to find a running cluster again."""

    name: str
    ports: dict[str, int]
    pids: dict[str, int] = {}
    node: NodeNetwork | None = None
    """The real node's network, when the cluster has one."""


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
            NODE_PEER_LABEL: "true",
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
        return _server(self.load_state())

    def log(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    def real_node(self, state: ClusterState | None = None) -> RealNode | None:
        """The cluster's real node, if it was started with one."""
        network = (state or self.load_state()).node
        return None if network is None else RealNode(self.name, self.root / "node", network)

    # --- bring-up --------------------------------------------------------------------------

    def up(
        self,
        timeout: float,
        cancelled: Callable[[], bool] = lambda: False,
        progress: Callable[[str], None] = lambda _: None,
        real_node: bool = False,
    ) -> None:
        """Starts every component from fresh data and waits until the nodes are Ready; with
        `real_node`, a real node too, beside which KWOK's fake nodes are tainted (pods go to the
        real one unless they tolerate `kwok.x-k8s.io/node=fake`) and are not peers.

        On any failure the components already started are stopped and the error says which
        component failed and where its log is."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.log_dir.mkdir(exist_ok=True)
        state = ClusterState(
            name=self.name,
            ports={c: free_port() for c in (*COMPONENTS, "etcd-peer")},
            node=NodeNetwork.allocate() if real_node else None,
        )
        self._save_state(state)
        started = time.monotonic()
        deadline = started + timeout
        try:
            node = self.real_node(state)
            if node is not None:  # the kube-apiserver listens on the node's link
                node.network.create()
            self._write_pki(state)
            for component in COMPONENTS:
                self._start(component, state)
                self._wait_healthy(component, state, deadline, cancelled)
                progress(f"{self.name}: {component} ready ({time.monotonic() - started:.1f}s)")
            fake = [n.name for n in default_nodes(self.name)]
            self._create_nodes(beside_real_node=node is not None)
            self._wait_nodes_ready(fake, deadline, cancelled)
            progress(f"{self.name}: fake nodes Ready ({time.monotonic() - started:.1f}s)")
            if node is not None:
                self._start_node(node, state, deadline, cancelled, progress)
                self._wait_nodes_ready([node.name], deadline, cancelled)
                progress(f"{self.name}: {node.name} Ready ({time.monotonic() - started:.1f}s)")
        except BaseException:
            self.down()
            raise

    def _start_node(
        self,
        node: RealNode,
        state: ClusterState,
        deadline: float,
        cancelled: Callable[[], bool],
        progress: Callable[[str], None],
    ) -> None:
        node.write_config(
            {c: self.kubeconfig(c, _server(state)) for c in ("kubelet", "kube-proxy")},
            self.pki_dir,
        )
        node.prepare_cgroups()
        for component in NODE_COMPONENTS:
            self._start(component, state)
            self._wait_healthy(component, state, deadline, cancelled)
            if component == "containerd":
                images = node.import_images()
                progress(f"{self.name}: images imported into the node: {', '.join(images)}")

    def _write_pki(self, state: ClusterState) -> None:
        ca = pki.CertificateAuthority(f"edgellm-dev-{self.name}")
        pki.write_pair(ca.pair, self.pki_dir, "ca")
        pki.write_pair(pki.service_account_key(), self.pki_dir, "sa")
        serving: tuple[str, ...] = (
            "127.0.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default.svc",
            "10.96.0.1",
        )
        if state.node is not None:
            serving += (state.node.host_address,)
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
            # The kube-apiserver's identity towards kubelets (logs, exec, port-forward).
            "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", ("system:masters",)),
        }
        if state.node is not None:
            node = self.real_node(state)
            assert node is not None
            # The Node authorizer knows kubelets by this name and group; kube-proxy's user is
            # bound to system:node-proxier by the kube-apiserver's default RBAC.
            identities["kubelet"] = (f"system:node:{node.name}", ("system:nodes",))
            identities["kube-proxy"] = ("system:kube-proxy", ())
            pki.write_pair(
                ca.issue(node.name, server_names=(state.node.node_address, node.name)),
                self.pki_dir,
                "kubelet-serving",
            )
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
        path.write_text(yaml.safe_dump(self.kubeconfig(user, _server(state))))
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
                f"--kubelet-client-certificate={d / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={d / 'apiserver-kubelet-client.key'}",
                f"--kubelet-certificate-authority={d / 'ca.crt'}",
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false",
                *_listen_flags(state),
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
        node = self.real_node(state)
        if component in NODE_COMPONENTS and node is not None:
            return node.command(component)
        raise ValueError(f"unknown component {component}")

    def _start(self, component: str, state: ClusterState) -> None:
        # containerd looks its runc shim up on the PATH.
        path = f"{tool('kube-apiserver').parent}:{os.environ.get('PATH', '')}"
        env = {**os.environ, "HOME": str(self.root), "PATH": path}
        state.pids[component] = spawn(
            self._command(component, state), self.log(component), self.root, env
        )
        self._save_state(state)

    def _healthy(self, component: str, state: ClusterState, http: httpx.Client) -> bool:
        node = self.real_node(state)
        if component in NODE_COMPONENTS and node is not None:
            return node.healthy(component)
        port = state.ports[component]
        if component == "etcd":
            url = f"http://127.0.0.1:{port}/health"
        elif component == "kwok":
            url = f"http://127.0.0.1:{port}/healthz"
        elif component == "kube-apiserver":
            url = f"{_server(state)}/readyz"
        else:
            url = f"https://127.0.0.1:{port}/healthz"
        try:
            return http.get(url).status_code == 200
        except httpx.HTTPError:
            return False

    def client_ssl_context(self, user: str = "admin") -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.pki_dir / "ca.crt")
        context.load_cert_chain(self.pki_dir / f"{user}.crt", self.pki_dir / f"{user}.key")
        return context

    def _wait_healthy(
        self, component: str, state: ClusterState, deadline: float, cancelled: Callable[[], bool]
    ) -> None:
        pid = state.pids[component]
        with httpx.Client(verify=self.client_ssl_context(), timeout=2.0) as http:
            while not self._healthy(component, state, http):
                if cancelled():
                    raise StartCancelledError(f"{self.name}: start of {component} was cancelled")
                if not alive(pid):  # our own child, just started: no other program's pid
                    raise ComponentFailedError(
                        self.name, component, "exited during start", self.log(component)
                    )
                if time.monotonic() > deadline:
                    raise ComponentFailedError(
                        self.name, component, "was not healthy in time", self.log(component)
                    )
                time.sleep(0.2)

    def _create_nodes(self, beside_real_node: bool) -> None:
        with api_client(self.kubeconfig("admin")) as api:
            core = client.CoreV1Api(api)
            for node in default_nodes(self.name):
                manifest = node.manifest()
                if beside_real_node:  # pods and peers are the real node's, as in a home lab
                    manifest["spec"]["taints"] = [FAKE_NODE_TAINT]
                    del manifest["metadata"]["labels"][NODE_PEER_LABEL]
                core.create_node(manifest)

    def _wait_nodes_ready(
        self, names: list[str], deadline: float, cancelled: Callable[[], bool]
    ) -> None:
        with api_client(self.kubeconfig("admin")) as api:
            core = client.CoreV1Api(api)
            while True:
                ready = {
                    n.metadata.name
                    for n in core.list_node().items
                    if any(
                        c.type == "Ready" and c.status == "True" for c in n.status.conditions or []
                    )
                }
                waiting = sorted(set(names) - ready)
                if not waiting:
                    return
                if cancelled():
                    raise StartCancelledError(f"{self.name}: start was cancelled")
                if time.monotonic() > deadline:
                    real = self.real_node()
                    component = "kubelet" if real and real.name in waiting else "kwok"
                    raise ComponentFailedError(
                        self.name,
                        component,
                        f"did not make {', '.join(waiting)} Ready in time",
                        self.log(component),
                    )
                time.sleep(0.3)

    # --- teardown --------------------------------------------------------------------------

    def down(self) -> None:
        """Stops every component still running, the last started first; a real node's pods
        are removed and its network, mounts and cgroups cleaned up."""
        try:
            state = self.load_state()
        except ClusterStateError:
            return
        node = self.real_node(state)
        if node is not None:
            self._stop(state, "kubelet")
            node.remove_pods()
            for component in ("kube-proxy", "containerd"):
                self._stop(state, component)
            node.clean_up()
        for component in reversed(COMPONENTS):
            self._stop(state, component)

    def _stop(self, state: ClusterState, component: str) -> None:
        pid = state.pids.get(component)
        if pid is not None and runs(pid, component):
            terminate(pid)

    def stop_component(self, component: str) -> None:
        """Stops one component, as a crash or a partition would (fault tests use this)."""
        self._stop(self.load_state(), component)

    def start_component(self, component: str, timeout: float = 120.0) -> None:
        """Starts a stopped component again, on the same port and data."""
        state = self.load_state()
        self._start(component, state)
        self._wait_healthy(component, state, time.monotonic() + timeout, lambda: False)

    def running_pids(self) -> dict[str, int]:
        state = self.load_state()
        return {c: pid for c, pid in state.pids.items() if runs(pid, c)}

    def memory_mib(self) -> dict[str, float]:
        """Resident memory of each running component, in MiB."""
        return {c: rss_kib(pid) / 1024 for c, pid in self.running_pids().items()}


def _server(state: ClusterState) -> str:
    """The kube-apiserver's URL: loopback, or this machine's end of the real node's link."""
    host = "127.0.0.1" if state.node is None else state.node.host_address
    return f"https://{host}:{state.ports['kube-apiserver']}"


def _listen_flags(state: ClusterState) -> list[str]:
    if state.node is None:
        # Endpoints may not hold loopback addresses, and nothing routes to this one.
        return [
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
        ]
    # Pods reach it through the `kubernetes` Service, whose endpoint is this address.
    address = state.node.host_address
    return [f"--bind-address={address}", f"--advertise-address={address}"]
