"""Real local clusters for the end-to-end tests, started once per test session.

Each cluster is a real etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK
controller from the pinned binaries (hack/tools.sh), with EdgeLLM's CRDs installed. Set
EDGELLM_E2E_CLUSTERS to change how many (default 3, as the federation tests need).
"""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from edgellm.api import KINDS, custom_resource_definition
from edgellm.dev.cluster import LocalCluster
from edgellm.dev.federation import LocalFederation
from edgellm.dev.tools import tool
from edgellm.kube import api_client, install_crds


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    federation = LocalFederation(tmp_path_factory.mktemp("federation"))
    count = int(os.environ.get("EDGELLM_E2E_CLUSTERS", "3"))
    federation.up(count, progress=lambda line: None)
    try:
        definitions = [custom_resource_definition(k) for k in KINDS]
        for cluster in federation.clusters:
            with api_client(cluster.kubeconfig("admin")) as api:
                install_crds(api, definitions)
        yield federation
    finally:
        federation.down()


@pytest.fixture(scope="session")
def cluster(federation: LocalFederation) -> LocalCluster:
    return federation.clusters[0]


@pytest.fixture
def api(cluster: LocalCluster) -> Iterator[client.ApiClient]:
    with api_client(cluster.kubeconfig("admin")) as api:
        yield api


@pytest.fixture(scope="session")
def kubeconfig_file(federation: LocalFederation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kubeconfig") / "config"
    path.write_text(yaml.safe_dump(federation.kubeconfig()))
    return path


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
