"""Federation benchmark: many peers across three local clusters, each with its own operator.

Creates KWOK nodes labelled as peers (the operators turn them into PeerNodes) and standalone
PeerNodes, spread evenly over the clusters, then measures how long until every cluster holds
every peer (its own and the mirrors), and each operator's peak RSS and CPU time. Writes JSON to
--out and prints it.

    python -m benchmarks.federation --peers 1000 --out bench-results/federation.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from edgellm.api import KINDS, custom_resource_definition
from edgellm.dev.cluster import FakeNode, LocalCluster
from edgellm.dev.federation import LocalFederation
from edgellm.dev.processes import process_usage
from edgellm.federation.rbac import federation_manifests
from edgellm.kube import api_client, apply, install_crds

CLUSTERS = 3


def _peer_count(cluster: LocalCluster) -> int:
    with api_client(cluster.kubeconfig("admin")) as api:
        items = client.CustomObjectsApi(api).list_cluster_custom_object(
            "edgellm.io", "v1alpha1", "peernodes"
        )["items"]
    return len(items)


def _standalone_peer(cluster: str, index: int) -> dict[str, Any]:
    return {
        "apiVersion": "edgellm.io/v1alpha1",
        "kind": "PeerNode",
        "metadata": {"name": f"{cluster}-standalone-{index}"},
        "spec": {
            "cluster": cluster,
            "endpoint": f"http://127.0.0.1:{9000 + index % 1000}",
            "roles": ["prefill", "decode"],
            "backends": ["llamacpp"],
            "resources": {"cpu": 4, "memory": "8Gi"},
            "heartbeatTTLSeconds": 3600,
        },
    }


def run(peers: int, node_share: float, timeout: float, workdir: Path) -> dict[str, Any]:
    federation = LocalFederation(workdir / "clusters")
    federation.up(CLUSTERS, progress=lambda line: print(line, file=sys.stderr))
    operators: list[subprocess.Popen[bytes]] = []
    try:
        kubeconfigs = {}
        for cluster in federation.clusters:
            with api_client(cluster.kubeconfig("admin")) as api:
                install_crds(api, [custom_resource_definition(k) for k in KINDS])
                apply(api, federation_manifests(cluster.name))
            path = workdir / f"{cluster.name}.kubeconfig"
            path.write_text(yaml.safe_dump(cluster.kubeconfig("admin")))
            kubeconfigs[cluster.name] = path
            identity = cluster.kubeconfig("operator")
            (workdir / f"{cluster.name}-operator.kubeconfig").write_text(yaml.safe_dump(identity))
        names = list(kubeconfigs)
        for name in names[1:]:
            token = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "edgellm",
                    "federation",
                    "token",
                    "create",
                    f"--kubeconfig={kubeconfigs[names[0]]}",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "edgellm",
                    "federation",
                    "join",
                    token,
                    f"--kubeconfig={kubeconfigs[name]}",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
        for name, kubeconfig in kubeconfigs.items():
            log = (workdir / f"operator-{name}.log").open("wb")
            operators.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "edgellm",
                        "operator",
                        f"--cluster={name}",
                        f"--kubeconfig={kubeconfig}",
                        "--metrics-port=0",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        # The 3 default fake nodes of each cluster are peers too.
        baseline = 3 * CLUSTERS
        shares = [(peers - baseline) // CLUSTERS] * CLUSTERS
        shares[0] += (peers - baseline) % CLUSTERS
        node_counts = [int(share * node_share) for share in shares]
        started = time.monotonic()
        for cluster, share, nodes in zip(federation.clusters, shares, node_counts, strict=True):
            with api_client(cluster.kubeconfig("admin")) as api:
                core, objects = client.CoreV1Api(api), client.CustomObjectsApi(api)
                for i in range(nodes):
                    node = FakeNode(f"{cluster.name}-bench-{i}", cpu="8", memory="32Gi")
                    core.create_node(node.manifest())
                for i in range(share - nodes):
                    objects.create_cluster_custom_object(
                        "edgellm.io", "v1alpha1", "peernodes", _standalone_peer(cluster.name, i)
                    )
        total = baseline + sum(shares)
        created = time.monotonic() - started
        print(f"created {total} peers in {created:.1f}s; waiting for convergence", file=sys.stderr)
        peaks = {name: 0.0 for name in names}
        converged = None
        while time.monotonic() - started < timeout:
            for name, operator in zip(names, operators, strict=True):
                peaks[name] = max(peaks[name], process_usage(operator.pid)[0])
            counts = [_peer_count(c) for c in federation.clusters]
            print(
                f"  {time.monotonic() - started:6.1f}s peers per cluster: {counts}", file=sys.stderr
            )
            if all(count == total for count in counts):
                converged = time.monotonic() - started
                break
            time.sleep(2)
        usage = {name: process_usage(op.pid) for name, op in zip(names, operators, strict=True)}
        return {
            "peers": total,
            "kwok_node_peers": baseline + sum(node_counts),
            "standalone_peers": sum(shares) - sum(node_counts),
            "clusters": CLUSTERS,
            "create_seconds": round(created, 1),
            "converged_seconds": None if converged is None else round(converged, 1),
            "operators": {
                name: {
                    "peak_rss_mib": round(peaks[name], 1),
                    "cpu_seconds": round(usage[name][1], 1),
                }
                for name in names
            },
            "target": "operator RSS under 250 MB (DESIGN.md)",
        }
    finally:
        for operator in operators:
            operator.terminate()
            operator.wait(timeout=30)
        federation.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1000, help="peers in all (default 1000)")
    parser.add_argument(
        "--node-share",
        type=float,
        default=0.2,
        help="fraction of each cluster's peers that are KWOK nodes (default 0.2)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds to wait for convergence"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/federation.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-") as workdir:
        result = run(args.peers, args.node_share, args.timeout, Path(workdir))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if result["converged_seconds"] is None:
        sys.exit(f"mirrors did not converge within {args.timeout:.0f}s")


if __name__ == "__main__":
    main()
