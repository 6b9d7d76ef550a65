"""The kopf registry of EdgeLLM's operator, and how to run it.

Handlers stay thin: they hand watch events and timers to the `Runtime`, which holds the logic's
state, and to the `PoolReconciler` of worker pools. Nothing registers at import time:
`build_registry(settings)` returns a fresh registry. With a peering, kopf pauses the handlers of
every replica but one, and `Leadership` runs the loops of that one only.
"""

import asyncio
import logging
import os
from typing import Any

import kopf
import yaml
from kopf._core.engines.peering import Identity  # the type of kopf's `identity`; not exported
from kubernetes import client, config
from prometheus_client import start_http_server

from edgellm.api import (
    GROUP,
    INFERENCE_REQUEST,
    NODE_PEER_LABEL,
    PEER_NODE,
    VERSION,
    WORKER_POOL,
)
from edgellm.api.inferencerequest import TERMINAL_PHASES
from edgellm.kube import new_api_client
from edgellm.operator.leadership import Leadership, Replica
from edgellm.operator.metrics import OperatorMetrics
from edgellm.operator.poolreconciler import PoolReconciler
from edgellm.operator.runtime import Runtime
from edgellm.operator.settings import OperatorSettings

RUNTIME = "runtime"
POOLS = "pools"
LEADERSHIP = "leadership"


def build_registry(
    operator_settings: OperatorSettings, metrics: OperatorMetrics, replica: Replica | None = None
) -> kopf.OperatorRegistry:
    """The operator's handlers; `replica` is this process in its peering, None standalone."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A fresh registry has none of kopf's implicit login handlers: KUBECONFIG, else the pod's.
        if os.environ.get("KUBECONFIG"):
            return kopf.login_with_kubeconfig(**kwargs)
        # In a pod, the official client's in-cluster login, as `_local_client` uses: it finds the
        # kube-apiserver as every Kubernetes client does (KUBERNETES_SERVICE_HOST), where kopf's
        # own service-account login needs cluster DNS for kubernetes.default.svc.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def start(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING  # our Events are explicit; no log chatter
        settings.watching.server_timeout = 60
        settings.peering.lifetime = operator_settings.peering_lifetime_seconds
        memo[RUNTIME] = runtime = Runtime(operator_settings, _local_client(), metrics)
        memo[POOLS] = pools = PoolReconciler(
            local=runtime.local,
            cluster=operator_settings.cluster,
            events=runtime.events,
            interval_seconds=operator_settings.pool_interval_seconds,
            image=operator_settings.worker_image,
        )

        async def lead(leading: bool) -> None:
            if leading:
                await runtime.start()
                pools.start()
            else:
                await pools.stop()
                await runtime.pause()
            metrics.leading.set(int(leading))

        if replica is None:
            await lead(True)  # before kopf's first watch event
            return
        memo[LEADERSHIP] = leadership = Leadership(
            local=runtime.local,
            replica=replica,
            interval=operator_settings.leadership_interval_seconds,
            lead=lead,
        )
        leadership.start()

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        runtime: Runtime = memo[RUNTIME]
        if LEADERSHIP in memo:
            await memo[LEADERSHIP].stop()
        await memo[POOLS].stop()
        await runtime.stop()
        runtime.local.close()

    @kopf.on.event(GROUP, VERSION, PEER_NODE.plural, registry=registry)
    async def peer_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        # In the event loop, not kopf's threads: it starts KV-event subscriptions.
        memo[RUNTIME].on_peer_event(event["type"], dict(event["object"]))

    @kopf.on.event(GROUP, VERSION, WORKER_POOL.plural, registry=registry)
    async def pool_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        # A new pool or a changed spec is reconciled at once; everything else (demand, pods)
        # by the pool loop's interval. No timer per pool: timers add finalizers, and deleting a
        # pool must not wait for the operator (the garbage collector removes its Deployment).
        observed = body.get("status", {}).get("observedGeneration")
        if observed != body["metadata"].get("generation"):
            memo[POOLS].wake()

    @kopf.daemon(
        GROUP,
        VERSION,
        INFERENCE_REQUEST.plural,
        cancellation_timeout=10.0,
        registry=registry,
    )
    async def request(
        body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any
    ) -> None:
        # One daemon per request while it lives; it returns once the request is finished, and
        # kopf does not restart a daemon that returned. `stopped` is set when it is deleted, or
        # when kopf pauses this replica (it starts the daemon again where it resumes).
        if body.get("status", {}).get("phase") in TERMINAL_PHASES:
            return
        runtime: Runtime = memo[RUNTIME]
        waiter = asyncio.Event()
        watch = asyncio.create_task(_flag(stopped, waiter))
        # On a takeover, kopf may resume requests before this replica has read the peers anew.
        leading = asyncio.create_task(runtime.leading.wait())
        try:
            await asyncio.wait({watch, leading}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.is_set():
                await runtime.requests.run(_plain(body), waiter)
        finally:
            watch.cancel()
            leading.cancel()

    @kopf.timer(
        "",
        "v1",
        "nodes",
        labels={NODE_PEER_LABEL: "true"},
        interval=operator_settings.node_interval_seconds,
        registry=registry,
    )
    async def node_peer(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await asyncio.to_thread(memo[RUNTIME].sync_node, _plain(body))

    return registry


async def _flag(stopped: kopf.DaemonStopped, event: asyncio.Event) -> None:
    await stopped.wait()
    event.set()


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {key: body[key] for key in body}


def _local_client() -> client.ApiClient:
    """The same credentials kopf logs in with: the kubeconfig, else the pod's ServiceAccount."""
    if os.environ.get("KUBECONFIG"):
        with open(os.environ["KUBECONFIG"]) as f:
            return new_api_client(yaml.safe_load(f))
    config.load_incluster_config()
    return client.ApiClient()


def run(settings: OperatorSettings) -> None:
    """Runs the operator until interrupted."""
    if settings.kubeconfig:
        os.environ["KUBECONFIG"] = str(settings.kubeconfig)  # read by kopf's login and ours
    metrics = OperatorMetrics()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr="0.0.0.0", registry=metrics.registry)
    replica = None if settings.peering is None else Replica.of_this_process(settings.peering)
    registry = build_registry(settings, metrics, replica)
    # Cluster-wide, so kopf peers through a ClusterKopfPeering (never a namespaced KopfPeering).
    # Standalone unless asked: kopf would otherwise join any peering named `default` it finds.
    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=True,
            standalone=replica is None,
            peering_name=None if replica is None else replica.peering,
            priority=None if replica is None else replica.priority,
            identity=None if replica is None else Identity(replica.identity),
            memo=kopf.Memo(),
        )
    )
