"""The Helm chart (charts/edgellm), with the real helm binary: lint, rendering over a matrix of
values, the values schema refusing bad values by name, and an install into a real local cluster
whose pods the scheduler binds to KWOK nodes, then an uninstall that leaves only the CRDs.
"""

import functools
import json
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgellm.dev.cluster import LocalCluster
from edgellm.dev.tools import tool
from tests.e2e.helpers import eventually, kubectl

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "edgellm"
RELEASE = "edgellm"
NAMESPACE = "edgellm-chart"
WAIT = 90.0

RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}

POOL: dict[str, Any] = {
    "name": "tiny-random",
    "namespace": "default",
    "spec": {
        "model": "tiny-random",
        "source": {"path": "/var/lib/edgellm/models/tiny-random.gguf"},
        "resources": {"cpu": 1, "memory": "1Gi"},
        "minReplicas": 0,
        "maxReplicas": 2,
    },
}

MATRIX: dict[str, list[str]] = {
    "defaults": [],
    "monitoring": [
        "--set=metrics.serviceMonitor.enabled=true",
        "--set=metrics.podMonitor.enabled=true",
        "--set=dashboards.enabled=true",
    ],
    "router": ["--set=router.replicas=3", "--set=router.policy=round-robin"],
    "pool": [f"--set-json=workers.pools=[{json.dumps(POOL)}]"],
    "ingress": [
        "--set=router.ingress.enabled=true",
        "--set=router.ingress.host=edgellm.home.example",
        "--set=router.ingress.className=nginx",
        '--set-json=router.ingress.tls=[{"secretName": "edgellm-tls"}]',
        "--set=router.statusPage=keys",
    ],
}


def helm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs the pinned helm; the caller checks returncode and output."""
    return subprocess.run(
        [str(tool("helm")), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def render(*values: str) -> list[dict[str, Any]]:
    result = helm("template", RELEASE, str(CHART), f"--namespace={NAMESPACE}", *values)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def by_component(objects: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    (found,) = [
        o
        for o in of_kind(objects, kind)
        if o["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    return found


# --- rendering -----------------------------------------------------------------------------


def test_the_chart_lints_cleanly() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_chart_runs_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (chart["apiVersion"], chart["version"]) == ("v2", "0.1.0")
    assert chart["appVersion"] == project["version"]
    images = {c["image"] for d in of_kind(render(), "Deployment") for c in _containers(d)}
    assert images == {
        f"ghcr.io/edgellm/operator:{project['version']}",
        f"ghcr.io/edgellm/router:{project['version']}",
    }


@pytest.mark.parametrize("case", MATRIX)
def test_every_pod_meets_the_restricted_pod_security_standard(case: str) -> None:
    for deployment in of_kind(render(*MATRIX[case]), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        # Both call the Kubernetes API, so both mount their token, each with its own account.
        assert pod["automountServiceAccountToken"] is True
        assert pod["serviceAccountName"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            assert container["securityContext"] == RESTRICTED_CONTAINER
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp, f"{container['name']} has no /tmp"
            assert "emptyDir" in volumes[tmp[0]["name"]]


@pytest.mark.parametrize("case", MATRIX)
def test_every_container_has_probes_and_resources(case: str) -> None:
    for deployment in of_kind(render(*MATRIX[case]), "Deployment"):
        for container in _containers(deployment):
            assert container["livenessProbe"]["httpGet"]
            assert container["readinessProbe"]["httpGet"]
            assert container["resources"]["requests"]["cpu"]
            assert container["resources"]["requests"]["memory"]
            assert container["resources"]["limits"]["memory"]


def test_the_operator_runs_with_its_cluster_and_metrics_port() -> None:
    objects = render("--set=cluster.name=home-a", "--set=operator.metricsPort=9191")
    operator = by_component(objects, "Deployment", "operator")
    (container,) = _containers(operator)
    assert container["command"] == ["edgellm"]
    assert container["args"][:3] == ["operator", "--cluster=home-a", "--metrics-port=9191"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9191, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}


@pytest.mark.parametrize(
    ("values", "replicas", "lifetime"),
    [([], 2, 15), (["--set=operator.replicas=3", "--set=operator.peeringLifetime=30"], 3, 30)],
)
def test_the_operator_replicas_join_the_release_s_peering(
    values: list[str], replicas: int, lifetime: int
) -> None:
    objects = render(*values)
    operator = by_component(objects, "Deployment", "operator")
    assert operator["spec"]["replicas"] == replicas
    # One works, the others stand by: a new pod may start before an old one stops.
    assert operator["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    (container,) = _containers(operator)
    assert "--peering=edgellm-operator" in container["args"]
    assert f"--peering-lifetime={lifetime}" in container["args"]
    (peering,) = of_kind(objects, "ClusterKopfPeering")
    assert peering["apiVersion"] == "kopf.dev/v1"
    assert peering["metadata"]["name"] == "edgellm-operator"
    assert "namespace" not in peering["metadata"]


def test_the_router_takes_its_settings_from_values() -> None:
    objects = render(*MATRIX["router"], "--set=router.rateLimit=10/second")
    router = by_component(objects, "Deployment", "router")
    assert router["spec"]["replicas"] == 3
    (container,) = _containers(router)
    assert container["args"] == [
        "router",
        f"--cluster={RELEASE}",
        "--policy=round-robin",
        "--rate-limit=10/second",
        "--api-keys-secret=edgellm-router-api-keys",
        f"--namespace={NAMESPACE}",
        "--status-page=loopback",
        "--host=0.0.0.0",
        "--port=8080",
    ]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    service = by_component(objects, "Service", "router")
    assert service["spec"]["ports"][0]["port"] == 8080
    assert service["spec"]["selector"] == router["spec"]["selector"]["matchLabels"]


def test_the_operator_holds_exactly_the_permissions_it_uses() -> None:
    objects = render()
    role = by_component(objects, "ClusterRole", "operator")
    rules = {
        (group, resource): tuple(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("edgellm.io", "peernodes"): ("get", "list", "watch", "create", "patch", "delete"),
        ("edgellm.io", "peernodes/status"): ("patch",),
        ("edgellm.io", "inferencerequests"): ("list", "watch", "patch"),
        ("edgellm.io", "inferencerequests/status"): ("patch",),
        ("edgellm.io", "federationmembers"): ("get", "list"),
        ("edgellm.io", "federationmembers/status"): ("patch",),
        ("edgellm.io", "workerpools"): ("list", "watch"),
        ("edgellm.io", "workerpools/status"): ("patch",),
        ("edgellm.io", "workerpools/finalizers"): ("update",),
        ("apps", "deployments"): ("get", "create", "patch"),
        ("", "pods"): ("list",),
        ("", "nodes"): ("list", "watch", "patch"),
        ("", "secrets"): ("get",),
        ("", "configmaps"): ("get", "create", "update"),
        ("", "events"): ("create",),
        ("kopf.dev", "clusterkopfpeerings"): ("get", "list", "watch", "patch"),
        ("apiextensions.k8s.io", "customresourcedefinitions"): ("list", "watch"),
    }
    (leases,) = [r for r in of_kind(objects, "Role") if r["metadata"]["name"].endswith("leases")]
    assert leases["metadata"]["namespace"] == "kube-node-lease"
    assert leases["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get"]}
    ]
    template = (CHART / "templates" / "operator-rbac.yaml").read_text().splitlines()
    rule_lines = [i for i, line in enumerate(template) if line.strip().startswith("- apiGroups")]
    assert all(template[i - 1].strip().startswith("#") for i in rule_lines), "a rule lacks a why"


def test_the_router_reads_only_its_api_key_secret_and_lists_peers_and_members() -> None:
    objects = render("--set=router.apiKeysSecret=keys", "--set=router.namespace=keys-ns")
    role = by_component(objects, "Role", "router")
    assert role["metadata"]["namespace"] == "keys-ns"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["keys"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    cluster_role = by_component(objects, "ClusterRole", "router")
    assert cluster_role["rules"] == [
        {"apiGroups": ["edgellm.io"], "resources": ["peernodes"], "verbs": ["list"]},
        {"apiGroups": ["edgellm.io"], "resources": ["federationmembers"], "verbs": ["list"]},
    ]


def test_the_status_page_goes_through_the_router_service_and_an_optional_ingress() -> None:
    assert not of_kind(render(), "Ingress")
    objects = render(*MATRIX["ingress"])
    (ingress,) = of_kind(objects, "Ingress")
    service = by_component(objects, "Service", "router")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "edgellm.home.example"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/"
    assert path["backend"]["service"] == {
        "name": service["metadata"]["name"],
        "port": {"name": service["spec"]["ports"][0]["name"]},
    }
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "edgellm-tls"}]
    (container,) = _containers(by_component(objects, "Deployment", "router"))
    assert "--status-page=keys" in container["args"]


def test_defaults_render_no_monitoring_dashboards_or_pools() -> None:
    kinds = {o["kind"] for o in render()}
    assert kinds == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
        "ClusterKopfPeering",
        "PodDisruptionBudget",
    }


def test_operator_replicas_get_a_disruption_budget_and_prefer_different_nodes() -> None:
    objects = render()
    (budget,) = of_kind(objects, "PodDisruptionBudget")
    operator = by_component(objects, "Deployment", "operator")
    pod_labels = operator["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (term,) = operator["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    single = render("--set=operator.replicas=1")
    assert not of_kind(single, "PodDisruptionBudget")


def test_monitoring_renders_monitors_and_a_configmap_per_dashboard() -> None:
    objects = render(*MATRIX["monitoring"])
    (service_monitor,) = of_kind(objects, "ServiceMonitor")
    (pod_monitor,) = of_kind(objects, "PodMonitor")
    assert service_monitor["apiVersion"] == pod_monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert {e["port"] for e in service_monitor["spec"]["endpoints"]} == {"http", "metrics"}
    ports = {
        p["name"]
        for d in of_kind(objects, "Deployment")
        for c in _containers(d)
        for p in c["ports"]
    }
    assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} <= ports
    dashboards = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    config_maps = of_kind(objects, "ConfigMap")
    assert sorted(name for c in config_maps for name in c["data"]) == dashboards
    assert all(c["metadata"]["labels"]["grafana_dashboard"] == "1" for c in config_maps)


def test_a_worker_pool_in_values_renders_a_workerpool_with_the_worker_image() -> None:
    (pool,) = of_kind(render(*MATRIX["pool"]), "WorkerPool")
    assert pool["apiVersion"] == "edgellm.io/v1alpha1"
    assert pool["metadata"]["name"] == "tiny-random"
    assert pool["metadata"]["namespace"] == "default"
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert pool["spec"] == {**POOL["spec"], "image": f"ghcr.io/edgellm/worker:{version}"}


def test_the_crds_are_the_generated_ones_and_kopfs_peering() -> None:
    result = helm("template", RELEASE, str(CHART), "--include-crds")
    assert result.returncode == 0, result.stderr
    crds = [
        d
        for d in yaml.safe_load_all(result.stdout)
        if d and d["kind"] == "CustomResourceDefinition"
    ]
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "clusterkopfpeerings.kopf.dev",
        "federationmembers.edgellm.io",
        "inferencerequests.edgellm.io",
        "peernodes.edgellm.io",
        "workerpools.edgellm.io",
    ]


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("--set=router.replicas=-1", "/router/replicas"),
        ("--set=router.policy=fastest", "/router/policy"),
        ("--set=replicaCount=2", "'replicaCount'"),
        ("--set=router.replicas=three", "/router/replicas"),
        ("--set=operator.replicas=0", "/operator/replicas"),
        ("--set=operator.peeringLifetime=2", "/operator/peeringLifetime"),
        ("--set=podSecurity.runAsUser=0", "/podSecurity/runAsUser"),
        ("--set=router.rateLimit=lots", "/router/rateLimit"),
        ("--set=router.statusPage=open", "/router/statusPage"),
        ("--set=router.ingress.path=status", "/router/ingress/path"),
        ("--set=router.ingress.host=Not A Host", "/router/ingress/host"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(value: str, field: str) -> None:
    for args in (["template", RELEASE, str(CHART), value], ["lint", str(CHART), value]):
        result = helm(*args)
        assert result.returncode != 0, f"helm {args[0]} accepted {value}"
        assert field in result.stdout + result.stderr


# --- a real cluster --------------------------------------------------------------------------


@pytest.fixture
def namespace(cluster: LocalCluster, kubeconfig_file: Path) -> Iterator[str]:
    context = f"--context={cluster.name}"
    created = kubectl(kubeconfig_file, context, "create", "namespace", NAMESPACE)
    assert created.returncode == 0, created.stderr
    # PodSecurity admission refuses any pod of the namespace short of the restricted standard.
    labelled = kubectl(
        kubeconfig_file,
        context,
        "label",
        "namespace",
        NAMESPACE,
        "pod-security.kubernetes.io/enforce=restricted",
    )
    assert labelled.returncode == 0, labelled.stderr
    # Pods are refused until the controller-manager has made the namespace's default account.
    eventually(
        lambda: (
            kubectl(
                kubeconfig_file, context, "get", "serviceaccount", "default", "-n", NAMESPACE
            ).returncode
            == 0
        ),
        60,
        "the namespace has its default ServiceAccount",
    )
    plain = kubectl(
        kubeconfig_file,
        context,
        *("run", "plain", "--image=busybox", "-n", NAMESPACE, "--dry-run=server"),
    )
    assert plain.returncode != 0, "the namespace admits a pod short of the restricted standard"
    assert "restricted" in plain.stderr
    try:
        yield NAMESPACE
    finally:
        kubectl(kubeconfig_file, context, "delete", "namespace", NAMESPACE, "--wait=false")


def test_install_binds_the_pods_to_kwok_nodes_and_uninstall_leaves_only_the_crds(
    cluster: LocalCluster, kubeconfig_file: Path, namespace: str
) -> None:
    context = f"--context={cluster.name}"
    target = [f"--kubeconfig={kubeconfig_file}", f"--kube-context={cluster.name}"]
    installed = helm(
        "install",
        RELEASE,
        str(CHART),
        f"--namespace={namespace}",
        "--set=router.replicas=2",
        "--set=dashboards.enabled=true",
        f"--set-json=workers.pools=[{json.dumps({**POOL, 'namespace': ''})}]",
        *target,
    )
    assert installed.returncode == 0, installed.stderr
    assert "kubectl port-forward" in installed.stdout  # NOTES.txt

    manifest = helm("get", "manifest", RELEASE, f"--namespace={namespace}", *target)
    assert manifest.returncode == 0, manifest.stderr
    objects = [d for d in yaml.safe_load_all(manifest.stdout) if d]
    assert not of_kind(objects, "CustomResourceDefinition")
    # The rendered WorkerPool passes the real CRD's validation, in the release's namespace.
    (pool,) = of_kind(objects, "WorkerPool")
    assert pool["metadata"]["namespace"] == namespace
    dashboards = len(list((CHART / "dashboards").glob("*.json")))
    assert len(of_kind(objects, "ConfigMap")) == dashboards
    for obj in objects:
        assert _exists(kubeconfig_file, context, obj), f"{obj['kind']} {obj['metadata']['name']}"

    def running(component: str, replicas: int) -> list[dict[str, Any]] | None:
        selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component={component}"
        listed = kubectl(
            kubeconfig_file, context, "get", "pods", "-n", namespace, "-l", selector, "-o", "json"
        )
        pods = json.loads(listed.stdout)["items"] if listed.returncode == 0 else []
        bound = [
            p for p in pods if p["spec"].get("nodeName") and p["status"].get("phase") == "Running"
        ]
        return bound if len(bound) == replicas else None

    nodes = {f"{cluster.name}-cpu-0", f"{cluster.name}-cpu-1", f"{cluster.name}-gpu-0"}
    for component, replicas in (("operator", 2), ("router", 2)):
        pods = eventually(
            functools.partial(running, component, replicas),
            WAIT,
            f"{replicas} {component} pod(s) Running",
        )
        assert {p["spec"]["nodeName"] for p in pods} <= nodes

    uninstalled = helm("uninstall", RELEASE, f"--namespace={namespace}", "--wait", *target)
    assert uninstalled.returncode == 0, uninstalled.stderr
    for obj in objects:
        eventually(
            functools.partial(_absent, kubeconfig_file, context, obj),
            WAIT,
            f"{obj['kind']} {obj['metadata']['name']} is removed",
        )
    crds = kubectl(kubeconfig_file, context, "get", "crds", "-o", "name")
    assert crds.returncode == 0, crds.stderr
    for name in (
        "peernodes.edgellm.io",
        "inferencerequests.edgellm.io",
        "workerpools.edgellm.io",
        "federationmembers.edgellm.io",
        "clusterkopfpeerings.kopf.dev",
    ):
        assert f"customresourcedefinition.apiextensions.k8s.io/{name}" in crds.stdout


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return list(deployment["spec"]["template"]["spec"]["containers"])


def _exists(kubeconfig: Path, context: str, obj: dict[str, Any]) -> bool:
    kind = (
        f"{obj['kind']}.{obj['apiVersion'].split('/')[0]}"
        if "/" in obj["apiVersion"]
        else obj["kind"]
    )
    args = ["get", kind, obj["metadata"]["name"], "--ignore-not-found", "-o", "name"]
    if "namespace" in obj["metadata"]:
        args += ["-n", obj["metadata"]["namespace"]]
    result = kubectl(kubeconfig, context, *args)
    assert result.returncode == 0, result.stderr
    return bool(result.stdout.strip())


def _absent(kubeconfig: Path, context: str, obj: dict[str, Any]) -> bool:
    return not _exists(kubeconfig, context, obj)
