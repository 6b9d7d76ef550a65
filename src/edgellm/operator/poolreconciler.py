"""The operator's worker-pool loop: every WorkerPool gets its Deployment, sized by demand.

Started by the kopf startup handler (`app.py`), woken early by its WorkerPool watch when a pool
is new or its spec changed, and otherwise run every `pool_interval_seconds`: demand changes as
requests come and go, and pods become ready or stay unschedulable, without any event on the
pool. One task does every reconciliation, so two never race for the same pool. Kubernetes calls
use the sync client in a worker thread; the decisions are the plain functions of `workerpools`.
"""

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from pydantic import ValidationError

from edgellm.api import WorkerPool
from edgellm.api.workerpool import WorkerPoolStatus
from edgellm.kube import APIError, NotFoundError, apply, objects, translated
from edgellm.operator import workerpools
from edgellm.operator.events import EventRecorder
from edgellm.operator.workerpools import PoolAssessment

logger = logging.getLogger(__name__)

FIELD_MANAGER = "edgellm-operator"
Body = dict[str, Any]


class PoolReconciler:
    def __init__(
        self,
        local: client.ApiClient,
        events: EventRecorder,
        interval_seconds: float,
        image: str = workerpools.DEFAULT_IMAGE,
    ) -> None:
        self.local = local
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
        if not pools:
            return
        requests = objects.list_objects(self.local, objects.INFERENCE_REQUESTS)
        demand = workerpools.demand_by_model(requests)
        for body in pools:
            metadata = body["metadata"]
            model = (body.get("spec") or {}).get("model", "")
            try:
                self.reconcile(body, demand.get((metadata["namespace"], model), 0))
            except Exception:
                logger.exception(
                    "reconciling worker pool %s/%s failed", metadata["namespace"], metadata["name"]
                )

    def reconcile(self, body: Body, demand: int) -> None:
        """Applies the pool's Deployment and writes the pool's status and Events."""
        now = datetime.now(UTC)
        metadata = body["metadata"]
        try:
            pool = WorkerPool.model_validate(body)
        except ValidationError as e:
            previous = _previous_status(body)
            generation = metadata.get("generation")
            self._report(body, previous, _blocked(previous, generation, "InvalidSpec", str(e), now))
            return
        assessment = self._assess(pool, demand, now)
        self._report(body, pool.status, assessment)

    def _assess(self, pool: WorkerPool, demand: int, now: datetime) -> PoolAssessment:
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
        pods = client.CoreV1Api(self.local).list_namespaced_pod(
            namespace, label_selector=f"{workerpools.POOL_LABEL}={name}"
        )
        return workerpools.pool_status(
            pool, demand, applied, self.local.sanitize_for_serialization(pods)["items"], now
        )

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
