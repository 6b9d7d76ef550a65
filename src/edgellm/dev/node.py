"""A real node for a local cluster, beside KWOK's fake ones: containerd, runc, kubelet, kube-proxy.

Its pods run for real: images pulled from nowhere (they are imported from the archives
`make images` saves), containers under runc, a pod network, Services through kube-proxy, and the
kube-apiserver reached from pods through the `kubernetes` Service with their own ServiceAccount
tokens, as on any cluster.

Everything network-facing lives in a network namespace of its own (`edgellm-<index>`) joined to
this machine by a veth pair: the node is 10.201.<index>.2, this machine's end 10.201.<index>.1
(where the cluster's kube-apiserver then listens, as pods cannot reach loopback), and pods
10.244.<index>.0/24 on a bridge inside the namespace. containerd, kubelet and kube-proxy run in
that namespace, so their iptables rules, routes and bridge stay there; nothing is routed off the
machine. What it takes on a machine without systemd, on cgroup v1, as here:
- runc with the cgroupfs driver (kubelet's `cgroupDriver: cgroupfs`, `failCgroupV1: false`);
- `restrict_oom_score_adj`: a process without CAP_SYS_RESOURCE cannot lower a sandbox's
  oom_score_adj;
- a locally built sandbox image (`hack/pause`), pinned so that image GC never removes it;
- mounts shared between kubelet and containerd: both run in this mount namespace (nsenter
  switches only the network namespace).
`LocalCluster` (cluster.py) calls this when asked for a real node.
"""

import ipaddress
import json
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import BaseModel

from edgellm.dev.errors import DevError
from edgellm.dev.processes import netns_command, terminate
from edgellm.dev.tools import cache_dir, tool

NODE_COMPONENTS = ("containerd", "kubelet", "kube-proxy")
SANDBOX_IMAGE = "localhost/edgellm/pause:1"  # hack/images.sh builds it under this name
KUBELET_PORT = 10250
KUBELET_HEALTHZ_PORT = 10248
PROXY_HEALTHZ_PORT = 10256
CNI_PLUGINS = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
FAKE_NODE_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
_MAX_NETWORKS = 250


class NodeNetwork(BaseModel):
    """The addresses of one real node, numbered by `index` (1 to 250)."""

    index: int

    @property
    def netns(self) -> str:
        return f"edgellm-{self.index}"

    @property
    def host_address(self) -> str:
        """This machine's end of the link: the kube-apiserver listens here."""
        return f"10.201.{self.index}.1"

    @property
    def node_address(self) -> str:
        return f"10.201.{self.index}.2"

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def _veth(self) -> tuple[str, str]:
        return f"edgellm{self.index}h", f"edgellm{self.index}n"

    def create(self) -> None:
        """The namespace, the veth pair between it and this machine, addresses and routes."""
        host, node = self._veth
        _ip("netns", "add", self.netns)
        try:
            _ip("link", "add", host, "type", "veth", "peer", "name", node)
            _ip("link", "set", node, "netns", self.netns)
            _ip("addr", "add", f"{self.host_address}/30", "dev", host)
            _ip("link", "set", host, "up")
            inside = ("-n", self.netns)
            _ip(*inside, "link", "set", "lo", "up")
            _ip(*inside, "addr", "add", f"{self.node_address}/30", "dev", node)
            _ip(*inside, "link", "set", node, "up")
            _ip(*inside, "route", "add", "default", "via", self.host_address)
            # This machine reaches pods (kubectl port-forward does not need it; debugging does).
            _ip("route", "add", self.pod_cidr, "via", self.node_address)
        except BaseException:
            self.delete()
            raise

    def delete(self) -> None:
        """Removes the namespace; its end of the veth pair, and so the pair, and the route to
        the pods go with it."""
        if Path(f"/run/netns/{self.netns}").exists():
            _ip("netns", "delete", self.netns)

    @classmethod
    def allocate(cls) -> "NodeNetwork":
        """The lowest index whose namespace does not exist yet."""
        for index in range(1, _MAX_NETWORKS + 1):
            network = cls(index=index)
            if not Path(f"/run/netns/{network.netns}").exists():
                return network
        raise DevError(f"all {_MAX_NETWORKS} real-node networks are in use: `edgellm dev down`")


def _ip(*args: str) -> None:
    _run(["ip", *args], f"`ip {' '.join(args)}`")


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DevError(f"{what} failed: {result.stderr.strip()}")
    return result.stdout


@dataclass(frozen=True)
class RealNode:
    """The files and commands of one real node of cluster `cluster`, under `root`."""

    cluster: str
    root: Path
    network: NodeNetwork

    @property
    def name(self) -> str:
        return f"{self.cluster}-node-0"

    @property
    def run_dir(self) -> Path:
        """containerd's sockets and state: short paths, as a unix socket's is limited."""
        return Path("/run/edgellm") / self.network.netns

    @property
    def socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def cgroup_root(self) -> str:
        return f"/{self.network.netns}"

    # --- configuration ---------------------------------------------------------------------

    def write_config(self, kubeconfig: dict[str, dict[str, Any]], pki: Path) -> None:
        """containerd's, the CNI's, kubelet's and kube-proxy's configuration; `kubeconfig`
        holds the kubelet's and kube-proxy's client configuration by component."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "containerd.toml").write_text(self._containerd_config())
        cni = self.root / "cni"
        cni.mkdir(exist_ok=True)
        (cni / "10-edgellm.conflist").write_text(json.dumps(self._cni_config(), indent=2))
        # Pods resolve no names outside the cluster: nothing leaves the machine.
        (self.root / "resolv.conf").write_text("")
        for component in ("kubelet", "kube-proxy"):
            path = self.root / f"{component}.kubeconfig"
            path.write_text(yaml.safe_dump(kubeconfig[component]))
            path.chmod(0o600)
        (self.root / "kubelet.yaml").write_text(yaml.safe_dump(self._kubelet_config(pki)))
        (self.root / "kube-proxy.yaml").write_text(yaml.safe_dump(self._proxy_config()))

    def _containerd_config(self) -> str:
        runc = tool("runc")
        # Version 3: containerd 2.4 migrates it, and (unlike a version 4 file) keeps [grpc].
        return f"""version = 3
root = "{self.root / "containerd"}"
state = "{self.run_dir / "state"}"
imports = []  # not this machine's /etc/containerd: the node is self-contained
# NRI's socket is machine-wide; no plugin needs it here.
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "{self.socket}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{SANDBOX_IMAGE}"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  # No CAP_SYS_RESOURCE here: runc cannot lower a sandbox's oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_PLUGINS}"]
    conf_dir = "{self.root / "cni"}"

[plugins."io.containerd.grpc.v1.cri"]
  # kubectl logs, exec and port-forward reach pods through this streaming server.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""

    def _cni_config(self) -> dict[str, Any]:
        gateway = str(next(ipaddress.ip_network(self.network.pod_cidr).hosts()))
        return {
            "cniVersion": "1.0.0",
            "name": "edgellm",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    # Pods' traffic to the node's link leaves with the node's address.
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.network.pod_cidr, "gateway": gateway}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.root / "cni-ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def _kubelet_config(self, pki: Path) -> dict[str, Any]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.network.node_address,
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzBindAddress": self.network.node_address,
            "healthzPort": KUBELET_HEALTHZ_PORT,
            # The kube-apiserver (logs, exec, port-forward) checks this certificate against the
            # cluster's CA, and authenticates with a client certificate of that CA.
            "tlsCertFile": str(pki / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "failCgroupV1": False,
            "failSwapOn": False,
            "resolvConf": str(self.root / "resolv.conf"),
            "podLogsDir": str(self.root / "pod-logs"),
            "staticPodPath": "",
            "serializeImagePulls": False,
            # Nothing can be pulled again: never collect images, never evict for a full disk.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "maxPods": 110,
        }

    def _proxy_config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.root / "kube-proxy.kubeconfig")},
            "hostnameOverride": self.name,
            "mode": "iptables",
            "clusterCIDR": self.network.pod_cidr,
            "bindAddress": self.network.node_address,
            "healthzBindAddress": f"{self.network.node_address}:{PROXY_HEALTHZ_PORT}",
            "metricsBindAddress": "127.0.0.1:10249",
            # Leave the kernel's conntrack settings as they are: a namespace may not set them.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        }

    # --- processes -------------------------------------------------------------------------

    def command(self, component: str) -> list[str]:
        if component == "containerd":
            command = [str(tool("containerd")), f"--config={self.root / 'containerd.toml'}"]
        elif component == "kubelet":
            command = [
                str(tool("kubelet")),
                f"--config={self.root / 'kubelet.yaml'}",
                f"--kubeconfig={self.root / 'kubelet.kubeconfig'}",
                f"--root-dir={self.root / 'kubelet'}",
                f"--node-ip={self.network.node_address}",
                f"--hostname-override={self.name}",
                "--v=1",
            ]
        elif component == "kube-proxy":
            command = [str(tool("kube-proxy")), f"--config={self.root / 'kube-proxy.yaml'}"]
        else:
            raise ValueError(f"unknown node component {component}")
        return netns_command(self.network.netns, command)

    def healthy(self, component: str) -> bool:
        if component == "containerd":
            return _connects(self.socket)
        port = KUBELET_HEALTHZ_PORT if component == "kubelet" else PROXY_HEALTHZ_PORT
        return _http_ok(f"http://{self.network.node_address}:{port}/healthz")

    def prepare_cgroups(self) -> None:
        """kubelet's cgroup root, in every cgroup v1 hierarchy (cpuset's needs its CPUs and
        memory nodes before anything can join it)."""
        base = Path("/sys/fs/cgroup")
        for hierarchy in base.iterdir():
            if not hierarchy.is_dir() or hierarchy.is_symlink() or hierarchy.name == "unified":
                continue
            path = hierarchy / self.cgroup_root.lstrip("/")
            path.mkdir(exist_ok=True)
            if hierarchy.name == "cpuset":
                for setting in ("cpuset.cpus", "cpuset.mems"):
                    (path / setting).write_text((hierarchy / setting).read_text())

    # --- images ----------------------------------------------------------------------------

    def import_images(self) -> list[str]:
        """Imports every archive `make images` saved into containerd's Kubernetes namespace,
        pinned (image GC never removes them); returns the names imported."""
        archives = sorted((cache_dir() / "images").glob("*.oci.tar"))
        if not any(a.name == "pause.oci.tar" for a in archives):
            raise DevError(f"no sandbox image in {cache_dir() / 'images'}: run `make images` first")
        ctr = [str(tool("ctr")), f"--address={self.socket}", "--namespace=k8s.io"]
        for archive in archives:
            _run([*ctr, "images", "import", str(archive)], f"importing {archive}")
        names = _run([*ctr, "images", "list", "--quiet"], "listing the images").split()
        for name in names:
            _run([*ctr, "images", "label", name, "io.cri-containerd.pinned=pinned"], "pinning")
        return [name for name in names if not name.startswith("sha256:")]

    # --- teardown --------------------------------------------------------------------------

    def remove_pods(self) -> None:
        """Stops and removes every pod while containerd still runs: their containers, shims and
        network namespaces go with them."""
        if not _connects(self.socket):
            return
        crictl = [str(tool("crictl")), f"--runtime-endpoint=unix://{self.socket}"]
        subprocess.run(
            [*crictl, "rmp", "--all", "--force"], capture_output=True, timeout=120, check=False
        )

    def clean_up(self) -> None:
        """After every process stopped: shims left over, mounts under the node's directories,
        the cgroups, the network namespace and the run directory."""
        for pid in _processes_mentioning(str(self.socket)):
            terminate(pid, grace=2.0)
        for directory in (self.root, self.run_dir):
            for mount in sorted(_mounts_under(directory), key=len, reverse=True):
                subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        base = Path("/sys/fs/cgroup")
        for hierarchy in base.iterdir():
            path = hierarchy / self.cgroup_root.lstrip("/")
            if path.is_dir():
                for cgroup in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if cgroup.is_dir():
                        cgroup.rmdir()
                path.rmdir()
        self.network.delete()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _connects(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _mounts_under(directory: Path) -> list[str]:
    prefix = str(directory.resolve()) + "/"
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target.startswith(prefix):
            mounts.append(target)
    return mounts


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found
