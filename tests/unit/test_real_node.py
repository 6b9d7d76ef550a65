"""A local real node's addresses and configuration: what it took to run kubelet and containerd
on a machine without systemd, on cgroup v1, without a registry or CAP_SYS_RESOURCE. The node
itself runs in tests/e2e/test_in_cluster.py."""

import ipaddress
import json
import tomllib
from pathlib import Path

import pytest
import yaml

from edgellm.dev.node import SANDBOX_IMAGE, NodeNetwork, RealNode
from edgellm.dev.tools import CACHE_ENV


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RealNode:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "cache" / "bin").mkdir(parents=True)
    for binary in ("runc", "containerd", "kubelet", "kube-proxy"):
        (tmp_path / "cache" / "bin" / binary).touch()
    node = RealNode("edge-1", tmp_path / "node", NodeNetwork(index=3))
    node.write_config({"kubelet": {"kind": "Config"}, "kube-proxy": {"kind": "Config"}}, tmp_path)
    return node


def test_a_node_s_addresses_are_private_and_its_own() -> None:
    one, two = NodeNetwork(index=1), NodeNetwork(index=2)
    link = ipaddress.ip_network(f"{one.host_address}/30", strict=False)
    assert ipaddress.ip_address(one.node_address) in link
    assert ipaddress.ip_network(one.pod_cidr).is_private
    assert not ipaddress.ip_network(one.pod_cidr).overlaps(ipaddress.ip_network(two.pod_cidr))
    assert one.netns != two.netns


def test_containerd_serves_on_the_node_s_own_socket_with_runc_and_the_local_sandbox(
    node: RealNode,
) -> None:
    config = tomllib.loads((node.root / "containerd.toml").read_text())
    assert config["grpc"]["address"] == str(node.socket)
    assert config["imports"] == []  # not this machine's /etc/containerd
    images = config["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == SANDBOX_IMAGE
    runtime = config["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    runc = runtime["containerd"]["runtimes"]["runc"]["options"]
    assert runc["SystemdCgroup"] is False
    assert runc["BinaryName"].endswith("/bin/runc")
    assert runtime["cni"]["conf_dir"] == str(node.root / "cni")


def test_pods_get_a_bridge_on_the_node_s_pod_network(node: RealNode) -> None:
    (config,) = (node.root / "cni").glob("*.conflist")
    bridge = json.loads(config.read_text())["plugins"][0]
    assert bridge["type"] == "bridge"
    (ranges,) = bridge["ipam"]["ranges"]
    assert ranges[0]["subnet"] == node.network.pod_cidr


def test_the_kubelet_uses_cgroupfs_on_cgroup_v1_and_never_collects_images(node: RealNode) -> None:
    config = yaml.safe_load((node.root / "kubelet.yaml").read_text())
    assert (config["cgroupDriver"], config["failCgroupV1"]) == ("cgroupfs", False)
    assert config["cgroupRoot"] == node.cgroup_root
    assert config["containerRuntimeEndpoint"] == f"unix://{node.socket}"
    assert config["imageGCHighThresholdPercent"] == 100
    assert config["authentication"]["anonymous"]["enabled"] is False
    assert config["authorization"]["mode"] == "Webhook"
    assert config["address"] == node.network.node_address
    assert (node.root / "resolv.conf").read_text() == ""  # nothing resolves off the machine


def test_node_processes_run_in_the_node_s_network_namespace_only(node: RealNode) -> None:
    for component in ("containerd", "kubelet", "kube-proxy"):
        command = node.command(component)
        # nsenter --net keeps this mount namespace: kubelet's mounts stay visible to runc.
        assert command[:3] == ["nsenter", f"--net=/run/netns/{node.network.netns}", "--"]
    proxy = yaml.safe_load((node.root / "kube-proxy.yaml").read_text())
    assert proxy["clusterCIDR"] == node.network.pod_cidr
    assert proxy["conntrack"]["maxPerCore"] == 0  # a namespace may not set the kernel's
