"""Real local clusters for the end-to-end tests, started once per test session.

Each cluster is a real etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK
controller from the pinned binaries (hack/tools.sh), with EdgeLLM's CRDs and federation roles
installed; three of them, as the federation tests need. The helpers the tests share are in
`tests/e2e/helpers.py`.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from edgellm.dev.cluster import LocalCluster
from edgellm.dev.federation import LocalFederation
from edgellm.kube import api_client
from tests.e2e.helpers import OperatorProcess, edgellm, prepare_cluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    federation = LocalFederation(tmp_path_factory.mktemp("federation"))
    federation.up(3, progress=lambda line: None)
    try:
        for cluster in federation.clusters:
            prepare_cluster(cluster)
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


@pytest.fixture(scope="session")
def cluster_kubeconfigs(
    federation: LocalFederation, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """One admin kubeconfig file per cluster, for the CLI."""
    directory = tmp_path_factory.mktemp("kubeconfigs")
    files = {}
    for cluster in federation.clusters:
        path = directory / cluster.name
        path.write_text(yaml.safe_dump(cluster.kubeconfig("admin")))
        files[cluster.name] = path
    return files


@pytest.fixture(scope="session")
def operators(
    federation: LocalFederation,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, OperatorProcess]]:
    logs = tmp_path_factory.mktemp("operator-logs")
    directory = tmp_path_factory.mktemp("operator-kubeconfigs")
    running = {}
    for cluster in federation.clusters:
        kubeconfig = directory / cluster.name
        kubeconfig.write_text(yaml.safe_dump(cluster.kubeconfig("operator")))
        running[cluster.name] = OperatorProcess(
            cluster.name, kubeconfig, logs / f"{cluster.name}.log"
        )
    for operator in running.values():
        operator.start()
    yield running
    for operator in running.values():
        operator.stop()


@pytest.fixture(scope="session")
def joined(
    federation: LocalFederation,
    cluster_kubeconfigs: dict[str, Path],
    operators: dict[str, OperatorProcess],
) -> LocalFederation:
    """Every cluster joined through the first one: the operators must spread the rest."""
    first, *others = [c.name for c in federation.clusters]
    for name in others:
        created = edgellm(
            "federation", "token", "create", f"--kubeconfig={cluster_kubeconfigs[first]}"
        )
        assert created.returncode == 0, created.stderr
        joined = edgellm(
            "federation",
            "join",
            created.stdout.strip(),
            f"--kubeconfig={cluster_kubeconfigs[name]}",
        )
        assert joined.returncode == 0, joined.stderr
    return federation
