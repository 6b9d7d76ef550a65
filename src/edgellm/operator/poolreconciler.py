"""The operator's worker-pool loop: every WorkerPool gets its Deployment, sized by demand, and
each of its worker pods a PeerNode.

Started by the kopf startup handler (`app.py`), woken early by its WorkerPool watch when a pool
is new or its spec changed, and otherwise run every `pool_interval_seconds`: demand changes as
requests come and go, and pods become ready or stay unschedulable, without any event on the
pool. Each run also registers the pools' pods as peers, heartbeats the Ready ones with the load
their worker reports, drains those being deleted and removes the peers of pods that are gone.
One task does every reconciliation, so two never race for the same pool. Kubernetes calls use
the sync client in a worker thread; the decisions are the plain functions of `workerpools` and
`poolpeers`.
"""

import asyncio
import contextlib
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client
from pydantic import ValidationError

from edgellm.api import PeerLoad, PeerNode, WorkerPool
from edgellm.api.workerpool import WorkerPoolStatus
from edgellm.kube import APIError, NotFoundError, apply, objects, translated
from edgellm.operator import peerhealth, poolpeers, workerpools
from edgellm.operator.events import EventRecorder
from edgellm.operator.workerpools import PoolAssessment
from edgellm.worker.registration import worker_load

logger = logging.getLogger(__name__)

FIELD_MANAGER = "edgellm-operator"
Body = dict[str, Any]


class PoolReconciler:
    def __init__(
        self,
        *,
        local: client.ApiClient,
        cluster: str,
        events: EventRecorder,
        interval_seconds: float,
        image: str = workerpools.DEFAULT_IMAGE,
    ) -> None:
        self.local = local
        self.cluster = cluster
        self.events = events
        self.interval_seconds = interval_seconds
        self.image = image
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._wake.set()  # pools that existed before this start are resumed at once
        self._task = asyncio.create_task(self._loop(), name="worker-pools")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        """Reconcile now rather than at the next interval."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_seconds)
            self._wake.clear()
            try:
                await asyncio.to_thread(self.reconcile_all)
            except Exception:  # this cluster's apiserver, or a bug: try again next time
                logger.exception("reconciling worker pools failed")

    def reconcile_all(self) -> None:
        pools = objects.list_objects(self.local, objects.WORKER_POOLS)
        pods = self._pool_pods()
        demand: Counter[tuple[str, str]] = Counter()
        nodes: dict[str, Body] = {}
        if pools:
            requests = objects.list_objects(self.local, objects.INFERENCE_REQUESTS)
            demand = workerpools.demand_by_model(requests)
            nodes = self._nodes()
        for body in pools:
            metadata = body["metadata"]
            model = (body.get("spec") or {}).get("model", "")
            own = pods.get((metadata["namespace"], metadata["name"]), [])
            try:
                self.reconcile(body, demand.get((metadata["namespace"], model), 0), own, nodes)
            except Exception:
                logger.exception(
                    "reconciling worker pool %s/%s failed", metadata["namespace"], metadata["name"]
                )
        live = {
            (pod["metadata"]["namespace"], pod["metadata"]["name"])
            for group in pods.values()
            for pod in group
        }
        self._remove_orphaned_peers(live)

    def reconcile(self, body: Body, demand: int, pods: list[Body], nodes: dict[str, Body]) -> None:
        """Applies the pool's Deployment, registers its pods as peers, and writes the pool's
        status and Events (the peers first: a pool that says Available can be scheduled onto)."""
        now = datetime.now(UTC)
        metadata = body["metadata"]
        try:
            pool = WorkerPool.model_validate(body)
        except ValidationError as e:
            previous = _previous_status(body)
            generation = metadata.get("generation")
            self._report(body, previous, _blocked(previous, generation, "InvalidSpec", str(e), now))
            return
        assessment = self._assess(pool, demand, pods, now)
        if not assessment.blocked:
            self._register_workers(pool, pods, nodes, now)
        self._report(body, pool.status, assessment)

    def _assess(
        self, pool: WorkerPool, demand: int, pods: list[Body], now: datetime
    ) -> PoolAssessment:
        name, namespace = pool.metadata.name, pool.metadata.namespace or "default"
        generation = pool.metadata.generation
        if len(name) > workerpools.MAX_POOL_NAME:
            message = f"the name has more than {workerpools.MAX_POOL_NAME} characters"
            return _blocked(pool.status, generation, "NameTooLong", message, now)
        current = self._read_deployment(namespace, name)
        if current is not None and not workerpools.is_owned(current, pool):
            message = f"Deployment {name} exists and is not this pool's: rename one of them"
            return _blocked(pool.status, generation, "DeploymentConflict", message, now)
        desired = workerpools.desired_replicas(pool, demand)
        manifest = workerpools.deployment(pool, desired, self.image)
        (applied,) = apply(self.local, [manifest], manager=FIELD_MANAGER)
        return workerpools.pool_status(pool, demand, applied, pods, now)

    def _pool_pods(self) -> dict[tuple[str, str], list[Body]]:
        """Every pool's worker pods, by (namespace, pool name): one list for all pools."""
        listed = client.CoreV1Api(self.local).list_pod_for_all_namespaces(
            label_selector=workerpools.POOL_LABEL
        )
        pods: dict[tuple[str, str], list[Body]] = {}
        for pod in self.local.sanitize_for_serialization(listed)["items"]:
            metadata = pod["metadata"]
            key = (metadata["namespace"], metadata["labels"][workerpools.POOL_LABEL])
            pods.setdefault(key, []).append(pod)
        return pods

    def _nodes(self) -> dict[str, Body]:
        """Each Node's metadata: its labels describe its GPUs."""
        listed = client.CoreV1Api(self.local).list_node()
        return {
            node["metadata"]["name"]: node["metadata"]
            for node in self.local.sanitize_for_serialization(listed)["items"]
        }

    def _register_workers(
        self, pool: WorkerPool, pods: list[Body], nodes: dict[str, Body], now: datetime
    ) -> None:
        """Applies the PeerNode of each of the pool's pods that has an address, and heartbeats
        the Ready ones with the load their worker reports. A heartbeat also sets the peer's
        conditions, as the health loop would at its next pass: a ready pod is a Ready peer now."""
        for pod in pods:
            node = nodes.get((pod.get("spec") or {}).get("nodeName", ""), {})
            if poolpeers.SIMULATED_NODE_ANNOTATION in (node.get("annotations") or {}):
                continue  # KWOK plays this pod: no worker answers at its address
            desired = poolpeers.peer_for_pod(pod, pool, self.cluster, node.get("labels") or {})
            if desired is None:
                continue
            (applied,) = apply(self.local, [desired], manager=FIELD_MANAGER)
            if workerpools.pod_ready(pod):
                self._heartbeat(applied, worker_load(desired["spec"]["endpoint"]), now)

    def _heartbeat(self, body: Body, load: PeerLoad, now: datetime) -> None:
        peer = PeerNode.model_validate(body)
        peer.status.last_heartbeat_time = now
        peer.status.load = load
        created = datetime.fromisoformat(body["metadata"]["creationTimestamp"])
        verdict = peerhealth.assess(peer, now, created, removal_grace=timedelta(0))
        for transition in verdict.transitions:
            self.events.record(body, transition.type, transition.reason, transition.message)
        peer.status.conditions = verdict.conditions
        peer.status.observed_generation = peer.metadata.generation
        name, status = body["metadata"]["name"], peer.status.to_wire()
        objects.patch_status(self.local, objects.PEER_NODES, name, status)

    def _remove_orphaned_peers(self, pods: set[tuple[str, str]]) -> None:
        peers = objects.list_objects(
            self.local, objects.PEER_NODES, label_selector=poolpeers.POD_LABEL
        )
        for name in poolpeers.orphaned_peers(peers, self.cluster, pods):
            logger.info("removing peer %s: its worker pod is gone", name)
            with contextlib.suppress(NotFoundError):  # removed meanwhile
                objects.delete(self.local, objects.PEER_NODES, name)

    def _read_deployment(self, namespace: str, name: str) -> Body | None:
        try:
            with translated():
                found = client.AppsV1Api(self.local).read_namespaced_deployment(name, namespace)
        except NotFoundError:
            return None
        deployment: Body = self.local.sanitize_for_serialization(found)
        return deployment

    def _report(self, body: Body, previous: WorkerPoolStatus, assessment: PoolAssessment) -> None:
        for transition in assessment.transitions:
            self.events.record(body, transition.type, transition.reason, transition.message)
        wire = assessment.status.to_wire()
        if wire == previous.to_wire():
            return
        metadata = body["metadata"]
        with contextlib.suppress(APIError):  # deleted meanwhile: nothing to report
            pools, name = objects.WORKER_POOLS, metadata["name"]
            objects.patch_status(self.local, pools, name, wire, metadata["namespace"])


def _previous_status(body: Body) -> WorkerPoolStatus:
    try:
        return WorkerPoolStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return WorkerPoolStatus()


def _blocked(
    previous: WorkerPoolStatus, generation: int | None, reason: str, message: str, now: datetime
) -> PoolAssessment:
    return workerpools.blocked_status(previous, generation, reason, message[:1000], now)
