"""WorkerPools end to end: the real operator keeps a Deployment of worker pods owned by each
pool, the real kube-scheduler binds them to KWOK's fake nodes (a GPU pool to the GPU node), the
pool's size follows the unfinished requests for its model, a pool no node can take says so,
and the garbage collector removes a deleted pool's workers.

KWOK plays the kubelets, so the worker containers do not run: what is checked is everything
Kubernetes decides about them (placement, resources, ownership, readiness as KWOK reports it).
"""

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from edgellm.api import GROUP, VERSION
from edgellm.dev.cluster import LocalCluster
from edgellm.federation.rbac import OPERATOR_SERVICE_ACCOUNT, OPERATORS_GROUP
from edgellm.kube import api_client
from edgellm.operator.workerpools import POOL_LABEL
from tests.e2e.helpers import OperatorProcess, create_fresh_peer, eventually, kubectl

NAMESPACE = "default"
WAIT = 90.0
BUSY_MODEL = "pooled-model"
Body = dict[str, Any]


def _objects(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def _pool(api: client.ApiClient, name: str) -> Body | None:
    try:
        found: Body = _objects(api).get_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "workerpools", name
        )
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise
    return found


def _deployment(api: client.ApiClient, name: str) -> Body | None:
    try:
        found = client.AppsV1Api(api).read_namespaced_deployment(name, NAMESPACE)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise
    deployment: Body = api.sanitize_for_serialization(found)
    return deployment


def _pods(api: client.ApiClient, pool: str) -> list[Body]:
    pods = client.CoreV1Api(api).list_namespaced_pod(
        NAMESPACE, label_selector=f"{POOL_LABEL}={pool}"
    )
    items: list[Body] = api.sanitize_for_serialization(pods)["items"]
    return items


def _condition(body: Body | None, type_: str) -> Body:
    conditions = ((body or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), {})


def _events(api: client.ApiClient, name: str) -> list[Body]:
    events = client.CoreV1Api(api).list_namespaced_event(
        NAMESPACE, field_selector=f"involvedObject.name={name},involvedObject.kind=WorkerPool"
    )
    items: list[Body] = api.sanitize_for_serialization(events)["items"]
    return items


def _ready(pod: Body) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


CreatePool = Callable[..., Body]


@pytest.fixture
def create_pool(
    api: client.ApiClient, operators: dict[str, OperatorProcess]
) -> Iterator[CreatePool]:
    """Creates WorkerPools in `default`; at the end deletes them and waits until their workers
    are gone, so that the next test finds the GPU free."""
    created: list[str] = []

    def create(name: str, **spec: Any) -> Body:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "WorkerPool",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"source": {"path": "/var/lib/edgellm/models/tiny-random.gguf"}, **spec},
        }
        pool: Body = _objects(api).create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "workerpools", body, field_validation="Strict"
        )
        created.append(name)
        return pool

    yield create
    for name in created:
        try:
            _objects(api).delete_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, "workerpools", name
            )
        except client.ApiException as e:
            if e.status != 404:
                raise

    def gone(name: str) -> Callable[[], bool]:
        return lambda: _deployment(api, name) is None and not _pods(api, name)

    for name in created:
        eventually(gone(name), WAIT, f"the workers of {name} are gone")


@pytest.fixture(scope="module")
def busy_peer(cluster: LocalCluster, operators: dict[str, OperatorProcess]) -> Iterator[str]:
    """A Ready peer of the first cluster holding BUSY_MODEL, whose worker accepts connections and
    never answers. Requests for the model are scheduled onto it and stay Running until deleted:
    a steady, real demand, which requests that fail at once (no peer holds the model) are not."""
    name = f"{cluster.name}-busy-worker"
    with socket.socket() as listener, api_client(cluster.kubeconfig("admin")) as api:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)  # the kernel completes connections; nothing ever reads them
        port = listener.getsockname()[1]
        objects = _objects(api)
        spec = {
            "cluster": cluster.name,
            "endpoint": f"http://127.0.0.1:{port}",
            "roles": ["prefill", "decode"],
            "backends": ["llamacpp"],
            "resources": {"cpu": 4, "memory": "8Gi"},
            "models": [{"name": BUSY_MODEL}],
            "heartbeatTTLSeconds": 3600,  # one heartbeat keeps it Ready for the whole module
        }
        create_fresh_peer(objects, name, spec)

        def ready() -> bool:
            body = objects.get_cluster_custom_object(GROUP, VERSION, "peernodes", name)
            return _condition(body, "Ready").get("status") == "True"

        try:
            eventually(ready, WAIT, f"the peer {name} is Ready")
            yield name
        finally:
            objects.delete_cluster_custom_object(GROUP, VERSION, "peernodes", name)


def test_a_gpu_pool_runs_its_worker_on_the_gpu_node_and_becomes_available(
    api: client.ApiClient,
    cluster: LocalCluster,
    create_pool: CreatePool,
    cluster_kubeconfigs: dict[str, Path],
) -> None:
    pool = create_pool(
        "gpu-pool",
        model="gpu-model",
        resources={"cpu": 2, "memory": "4Gi", "gpus": 1},
        nodeSelector={"nvidia.com/gpu.present": "true"},
    )

    deployment = eventually(lambda: _deployment(api, "gpu-pool"), WAIT, "the Deployment exists")
    assert deployment["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "edgellm.io/v1alpha1",
            "kind": "WorkerPool",
            "name": "gpu-pool",
            "uid": pool["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]

    def running_pod() -> Body | None:
        pods = _pods(api, "gpu-pool")
        ok = [p for p in pods if p["status"].get("phase") == "Running" and _ready(p)]
        return ok[0] if ok else None

    pod = eventually(running_pod, WAIT, "the worker pod is Running and Ready")
    # The real kube-scheduler placed it on the only node with a GPU; KWOK runs it there.
    assert pod["spec"]["nodeName"] == f"{cluster.name}-gpu-0"
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == "1"
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}

    def available() -> Body | None:
        body = _pool(api, "gpu-pool")
        status = (body or {}).get("status") or {}
        if status.get("readyReplicas") == 1 and _condition(body, "Available")["status"] == "True":
            return body
        return None

    body = eventually(available, WAIT, "the pool reports 1 ready worker and Available=True")
    assert body["status"]["desiredReplicas"] == 1
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"]
    assert _condition(body, "Scaled")["reason"] == "DesiredReplicasReady"
    assert {"WorkersReady", "DesiredReplicasReady"} <= {
        e["reason"] for e in _events(api, "gpu-pool")
    }

    shown = kubectl(cluster_kubeconfigs[cluster.name], "get", "wp", "gpu-pool", "-n", NAMESPACE)
    assert shown.returncode == 0, shown.stderr
    header, row = (line.split() for line in shown.stdout.splitlines())
    assert header == ["NAME", "MODEL", "BACKEND", "DEMAND", "DESIRED", "READY", "AVAILABLE", "AGE"]
    assert row[:7] == ["gpu-pool", "gpu-model", "llamacpp", "0", "1", "1", "True"]


def test_demand_for_the_model_raises_desired_replicas_up_to_max_and_back(
    api: client.ApiClient, create_pool: CreatePool, busy_peer: str
) -> None:
    create_pool(
        "busy-pool",
        model=BUSY_MODEL,
        resources={"cpu": "500m", "memory": "256Mi"},
        minReplicas=1,
        maxReplicas=3,
        requestsPerReplica=2,
    )

    def settled(desired: int, demand: int) -> Callable[[], Body | None]:
        def check() -> Body | None:
            body = _pool(api, "busy-pool")
            status = (body or {}).get("status") or {}
            figures = (status.get("demand"), status.get("desiredReplicas"))
            ready = (status.get("readyReplicas"), status.get("replicas"))
            return body if figures == (demand, desired) and ready == (desired, desired) else None

        return check

    eventually(settled(desired=1, demand=0), WAIT, "the idle pool keeps its 1 warm worker")

    names = [f"busy-{i}" for i in range(7)]
    for name in names:
        _objects(api).create_namespaced_custom_object(
            GROUP,
            VERSION,
            NAMESPACE,
            "inferencerequests",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "InferenceRequest",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {"model": BUSY_MODEL, "prompt": "Hello", "timeoutSeconds": 600},
            },
        )
    try:

        def in_flight() -> bool:
            listed = _objects(api).list_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, "inferencerequests"
            )["items"]
            running = {
                r["metadata"]["name"]
                for r in listed
                if r.get("status", {}).get("phase") == "Running"
                and r["status"]["assignment"].get("decodePeer") == busy_peer
            }
            return running >= set(names)

        eventually(in_flight, WAIT, f"the 7 requests are Running on {busy_peer}")
        # ceil(7 / 2) = 4 workers wanted, but no more than maxReplicas.
        eventually(settled(desired=3, demand=7), WAIT, "7 requests in demand: 3 ready workers")
        assert in_flight()  # still unfinished: the demand was real all along
        deployment = _deployment(api, "busy-pool")
        assert deployment is not None
        assert deployment["spec"]["replicas"] == 3
    finally:
        for name in names:
            _objects(api).delete_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, "inferencerequests", name
            )

    eventually(settled(desired=1, demand=0), WAIT, "without demand the pool shrinks back to 1")
    reasons = [e["reason"] for e in _events(api, "busy-pool")]
    assert "ScaledUp" in reasons
    assert "ScaledDown" in reasons


def test_a_pool_asking_for_more_gpus_than_any_node_has_is_unschedulable(
    api: client.ApiClient, create_pool: CreatePool
) -> None:
    create_pool("greedy-pool", model="huge-model", resources={"gpus": 2})

    def unschedulable() -> Body | None:
        scaled = _condition(_pool(api, "greedy-pool"), "Scaled")
        return scaled if scaled.get("reason") == "Unschedulable" else None

    scaled = eventually(unschedulable, WAIT, "the pool says its workers cannot be placed")
    assert scaled["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in scaled["message"]
    body = _pool(api, "greedy-pool")
    assert _condition(body, "Available")["status"] == "False"
    assert body is not None
    assert body["status"]["readyReplicas"] == 0
    (pod,) = _pods(api, "greedy-pool")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")

    def warning() -> Body | None:
        events = _events(api, "greedy-pool")
        found = [e for e in events if e["reason"] == "Unschedulable" and e["type"] == "Warning"]
        return found[0] if found else None

    event = eventually(warning, WAIT, "an Unschedulable Warning Event on the pool")
    assert "Insufficient nvidia.com/gpu" in event["message"]


def test_deleting_a_pool_garbage_collects_its_deployment_and_workers(
    api: client.ApiClient, create_pool: CreatePool
) -> None:
    create_pool("short-lived", model="short-model", resources={"cpu": "250m", "memory": "128Mi"})
    eventually(
        lambda: any(_ready(p) for p in _pods(api, "short-lived")),
        WAIT,
        "the pool's worker is Ready",
    )

    _objects(api).delete_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, "workerpools", "short-lived"
    )

    # Nothing in the operator deletes Deployments: kube-controller-manager's garbage collector
    # follows the owner reference.
    eventually(
        lambda: _pool(api, "short-lived") is None and _deployment(api, "short-lived") is None,
        WAIT,
        "the pool and then its Deployment are gone",
    )
    eventually(lambda: not _pods(api, "short-lived"), WAIT, "the pool's worker pods are gone")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"minReplicas": 3, "maxReplicas": 2}, "minReplicas must not exceed maxReplicas"),
        ({"backend": "vllm"}, "the vllm backend needs resources.gpus of at least 1"),
        ({"source": {"path": "/models/../../etc"}}, "path may not contain '..' segments"),
    ],
    ids=["min-above-max", "vllm-without-gpu", "parent-path"],
)
def test_the_apiserver_refuses_an_inconsistent_pool(
    api: client.ApiClient, spec: dict[str, Any], message: str
) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WorkerPool",
        "metadata": {"name": "inconsistent", "namespace": NAMESPACE},
        "spec": {"model": "m", "source": {"path": "/models/m.gguf"}, **spec},
    }
    with pytest.raises(client.ApiException) as caught:
        _objects(api).create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "workerpools", body
        )
    assert caught.value.status == 422
    assert message in str(caught.value.body)


def test_kubectl_explains_pool_fields(
    cluster: LocalCluster, cluster_kubeconfigs: dict[str, Path]
) -> None:
    explained = kubectl(
        cluster_kubeconfigs[cluster.name], "explain", "workerpool.spec.requestsPerReplica"
    )
    assert explained.returncode == 0, explained.stderr
    assert "Unfinished requests one worker is meant to carry" in " ".join(explained.stdout.split())


ALLOWED = [
    ("list", "edgellm.io", "workerpools", ""),
    ("watch", "edgellm.io", "workerpools", ""),
    ("patch", "edgellm.io", "workerpools", "status"),
    ("update", "edgellm.io", "workerpools", "finalizers"),
    ("list", "edgellm.io", "inferencerequests", ""),
    ("get", "apps", "deployments", ""),
    ("create", "apps", "deployments", ""),
    ("patch", "apps", "deployments", ""),
    ("list", "", "pods", ""),
    ("create", "", "events", ""),
]
DENIED = [
    ("patch", "edgellm.io", "workerpools", ""),  # the spec is the user's
    ("delete", "apps", "deployments", ""),  # the garbage collector's job
    ("create", "", "pods", ""),  # the Deployment controller's job
    ("delete", "", "pods", ""),
    ("get", "", "secrets", ""),
]


@pytest.mark.parametrize(
    "subject",
    [
        {"user": OPERATOR_SERVICE_ACCOUNT, "groups": ["system:serviceaccounts"]},
        {"user": "another-operator-replica", "groups": [OPERATORS_GROUP]},
    ],
    ids=["service-account", "operators-group"],
)
def test_the_operator_role_allows_what_pools_need_and_nothing_more(
    api: client.ApiClient, subject: dict[str, Any]
) -> None:
    """The local operator's certificate also carries system:masters (for everything else it
    does); this asks the real RBAC authorizer about the pool role alone."""
    authorization = client.AuthorizationV1Api(api)

    def allowed(verb: str, group: str, resource: str, subresource: str) -> bool:
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                **subject,
                "resourceAttributes": {
                    "namespace": NAMESPACE,
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                    "subresource": subresource,
                },
            },
        }
        return bool(authorization.create_subject_access_review(review).status.allowed)

    assert [a for a in ALLOWED if not allowed(*a)] == []
    assert [d for d in DENIED if allowed(*d)] == []
