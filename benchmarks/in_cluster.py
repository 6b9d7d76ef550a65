"""In-cluster benchmark (issue #14): what a home lab waits for and what a real node costs.

A local cluster with a real node (`edgellm dev up --real-node`, the images `make images` saved),
then the README's "Home lab with Helm" steps, each timed: the node up and Ready, `helm install`
with every pod Ready, the example WorkerPool applied until its worker pod is a Ready PeerNode,
and the example InferenceRequest until Succeeded. Then the node's memory: its components
(containerd, kubelet, kube-proxy, by RSS) and its pods (the RSS their cgroups count), and the
images' sizes. Needs root, as the real node does.

Progress goes to stderr; the figures are printed and written as JSON to --out.

    python -m benchmarks.in_cluster --out bench-results/in-cluster.json
"""

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import say, until
from edgellm.dev.federation import LocalFederation
from edgellm.dev.tools import cache_dir, tool

ROOT = Path(__file__).resolve().parents[1]


def _timed(what: str, step: Callable[[], object]) -> float:
    started = time.monotonic()
    step()
    seconds = round(time.monotonic() - started, 2)
    say(f"{what}: {seconds} s")
    return seconds


def _kubectl(kubeconfig: Path, *args: str) -> str:
    return _run(kubeconfig, str(tool("kubectl")), *args)


def _run(kubeconfig: Path, *command: str) -> str:
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result.stdout


def _pool_peer_ready(kubeconfig: Path) -> bool:
    peers = json.loads(
        _kubectl(kubeconfig, "get", "peernodes", "-l", "edgellm.io/worker-pool", "-o", "json")
    )["items"]
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for p in peers
        for c in p.get("status", {}).get("conditions", [])
    )


def _succeeded(kubeconfig: Path) -> bool:
    phase = _kubectl(kubeconfig, "get", "ir", "hello", "-o", "jsonpath={.status.phase}")
    if phase == "Failed":
        raise RuntimeError("the example InferenceRequest failed")
    return phase == "Succeeded"


def _cgroup_rss_mib(cgroup: str) -> float:
    """The resident memory (rss + mapped files) a cgroup v1 memory controller counts."""
    stat = Path(f"/sys/fs/cgroup/memory{cgroup}/memory.stat").read_text().split("\n")
    figures = dict(line.split() for line in stat if line)
    return round((int(figures["total_rss"]) + int(figures["total_mapped_file"])) / 2**20, 1)


def run(workdir: Path) -> dict[str, Any]:
    federation = LocalFederation(workdir)
    figures: dict[str, Any] = {}
    try:
        figures["nodeUpSeconds"] = _timed(
            "dev up --real-node",
            lambda: federation.up(1, progress=say, real_node=True),
        )
        kubeconfig = federation.kubeconfig_path
        cluster = federation.clusters[0]
        node = cluster.real_node()
        assert node is not None
        _kubectl(kubeconfig, "create", "namespace", "edgellm-system")
        for namespace in ("edgellm-system", "default"):
            _kubectl(
                kubeconfig, "label", "namespace", namespace,
                "pod-security.kubernetes.io/enforce=restricted",
            )  # fmt: skip
        install = [
            *(str(tool("helm")), "install", "edgellm", "charts/edgellm"),
            *("--namespace=edgellm-system", f"--set=cluster.name={cluster.name}"),
            *("--wait", "--timeout=5m"),
        ]
        figures["helmInstallSeconds"] = _timed(
            "helm install, every pod Ready", lambda: _run(kubeconfig, *install)
        )
        figures["workerPoolToPeerReadySeconds"] = _timed(
            "WorkerPool applied until its pod is a Ready peer",
            lambda: (
                _kubectl(kubeconfig, "apply", "-f", "examples/workerpool.yaml"),
                until(lambda: _pool_peer_ready(kubeconfig), 300, "the pool's peer is Ready"),
            ),
        )
        figures["inferenceRequestSeconds"] = _timed(
            "InferenceRequest applied until Succeeded",
            lambda: (
                _kubectl(kubeconfig, "apply", "-f", "examples/inference.yaml"),
                until(lambda: _succeeded(kubeconfig), 180, "the request succeeded"),
            ),
        )
        components = cluster.memory_mib()
        figures["nodeMemoryMiB"] = {
            "components": {
                c: round(components[c], 1) for c in ("containerd", "kubelet", "kube-proxy")
            },
            "pods": _cgroup_rss_mib(f"{node.cgroup_root}/kubepods"),
        }
        say(f"node memory: {figures['nodeMemoryMiB']}")
    finally:
        federation.down()
    figures["imageArchivesMB"] = {
        archive.name.removesuffix(".oci.tar"): round(archive.stat().st_size / 1e6, 1)
        for archive in sorted((cache_dir() / "images").glob("*.oci.tar"))
    }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-cluster-") as workdir:
        report = run(Path(workdir))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
