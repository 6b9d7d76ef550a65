"""N independent local clusters brought up together, with one kubeconfig for all of them.

`edgellm dev up --clusters N` and the e2e fixtures use this. Clusters start in parallel; if any
component of any cluster fails, or the user presses Ctrl-C, every process already started is
stopped before the error is raised, so nothing is left behind.
"""

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from edgellm.dev.cluster import LocalCluster
from edgellm.dev.errors import ClusterStateError, DevError, StartCancelledError
from edgellm.dev.tools import cache_dir

Progress = Callable[[str], None]


def default_workdir() -> Path:
    return cache_dir() / "dev"


def cluster_name(index: int) -> str:
    return f"edge-{index + 1}"


class _FederationState(BaseModel):
    clusters: list[str]


class LocalFederation:
    """The local clusters living in one work directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.state_file = workdir / "federation.json"
        self.kubeconfig_path = workdir / "kubeconfig"

    @property
    def clusters(self) -> list[LocalCluster]:
        try:
            state = _FederationState.model_validate_json(self.state_file.read_text())
        except (OSError, ValueError) as e:
            raise ClusterStateError(f"no local clusters in {self.workdir}: {e}") from e
        return [LocalCluster(name, self.workdir / name) for name in state.clusters]

    def is_running(self) -> bool:
        try:
            return any(c.running_pids() for c in self.clusters)
        except ClusterStateError:
            return False

    def up(
        self,
        count: int,
        timeout: float = 300.0,
        progress: Progress = print,
        real_node: bool = False,
    ) -> Path:
        """Starts `count` clusters and returns the path of the kubeconfig with one context each;
        with `real_node`, the first cluster gets a real node (`node.py`) beside its fake ones."""
        if count < 1:
            raise DevError("--clusters must be at least 1")
        if real_node and os.geteuid() != 0:
            raise DevError("a real node needs root: network namespaces, cgroups and mounts")
        if self.is_running():
            raise DevError(f"local clusters already run in {self.workdir}: run `edgellm dev down`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        names = [cluster_name(i) for i in range(count)]
        self.state_file.write_text(_FederationState(clusters=names).model_dump_json())
        clusters = self.clusters
        cancel = threading.Event()

        def start(cluster: LocalCluster) -> None:
            try:
                with_node = real_node and cluster is clusters[0]
                cluster.up(timeout, cancelled=cancel.is_set, progress=progress, real_node=with_node)
            except BaseException:
                cancel.set()
                raise

        pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="dev-up")
        try:
            futures = [pool.submit(start, c) for c in clusters]
            wait(futures)
        except BaseException:  # Ctrl-C while waiting
            cancel.set()
            pool.shutdown(wait=True)
            self.down()
            raise
        pool.shutdown()
        errors = [e for f in futures if (e := f.exception()) is not None]
        if errors:
            self.down()
            # The cause, not the cancellations it set off in the other clusters.
            raise next((e for e in errors if not isinstance(e, StartCancelledError)), errors[0])
        self.kubeconfig_path.write_text(yaml.safe_dump(self.kubeconfig()))
        self.kubeconfig_path.chmod(0o600)
        return self.kubeconfig_path

    def kubeconfig(self, user: str = "admin") -> dict[str, Any]:
        """One kubeconfig with a context per cluster, named after the cluster."""
        merged: dict[str, Any] = {"apiVersion": "v1", "kind": "Config"}
        for key in ("clusters", "users", "contexts"):
            merged[key] = [entry for c in self.clusters for entry in c.kubeconfig(user)[key]]
        merged["current-context"] = self.clusters[0].name
        return merged

    def down(self) -> None:
        """Stops every component of every cluster; their data stays until the next `up`."""
        try:
            clusters = self.clusters
        except ClusterStateError:
            return
        for cluster in clusters:
            cluster.down()
