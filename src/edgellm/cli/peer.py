"""`edgellm join` / `edgellm leave`: this machine as a peer of the federation."""

import contextlib
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Annotated

import typer

from edgellm.api import PeerNodeSpec
from edgellm.api._common import QUANTITY_PATTERN
from edgellm.api.peernode import PeerNetwork
from edgellm.cli._common import (
    ContextOption,
    KubeconfigOption,
    KVEventsTopicOption,
    VerboseOption,
    configure_logging,
    connect,
    one_line_errors,
)
from edgellm.federation.membership import local_cluster_name
from edgellm.kvcache import DEFAULT_TOPIC
from edgellm.worker import hardware
from edgellm.worker.registration import heartbeat_until, register
from edgellm.worker.registration import leave as drain_and_leave

NameOption = Annotated[
    str | None,
    typer.Option(help="The peer's name, unique in the federation (default: <cluster>-<hostname>)."),
]


def default_name(cluster: str) -> str:
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")
    return f"{cluster}-{host}"[:63].rstrip("-")


def join(
    endpoint: Annotated[str, typer.Option(help="URL of this machine's worker API.")],
    name: NameOption = None,
    role: Annotated[
        list[str] | None, typer.Option(help="prefill and/or decode (default both); repeatable.")
    ] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(
            help="llamacpp and/or vllm (default: llamacpp, plus vllm with an NVIDIA GPU)."
        ),
    ] = None,
    models_dir: Annotated[
        Path, typer.Option(help="Where this machine keeps model weights.")
    ] = Path("~/.cache/edgellm/models"),
    uplink_mbps: Annotated[float, typer.Option(help="Upload bandwidth, Mbit/s.")] = 100.0,
    downlink_mbps: Annotated[float, typer.Option(help="Download bandwidth, Mbit/s.")] = 100.0,
    region: Annotated[
        str, typer.Option(help="Locality label; peers in one region prefer each other.")
    ] = "",
    trust: Annotated[str, typer.Option(help="untrusted, community or trusted.")] = "community",
    kv_events: Annotated[
        str | None,
        typer.Option(
            help="Where schedulers subscribe to the worker's KV events (tcp://<this machine>:5557,"
            " as the worker's --kv-events binds it)."
        ),
    ] = None,
    kv_events_topic: KVEventsTopicOption = DEFAULT_TOPIC,
    rpc_server: Annotated[
        str | None,
        typer.Option(
            help="host:port of this machine's `edgellm stage`, lending its memory to models too"
            " large for one peer."
        ),
    ] = None,
    memory: Annotated[
        str | None,
        typer.Option(help="Memory to give workers, a quantity (default: 80% of this machine's)."),
    ] = None,
    heartbeat_ttl: Annotated[
        int, typer.Option(min=5, help="Seconds without a heartbeat before the peer is not Ready.")
    ] = 30,
    once: Annotated[bool, typer.Option(help="Register and exit, without heartbeating.")] = False,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Register this machine as a peer (CPU, memory, GPUs and models detected) and heartbeat
    until stopped; `edgellm leave` removes it."""
    configure_logging(verbose)
    with one_line_errors():
        api = connect(kubeconfig, context)
        cluster = local_cluster_name(api)
        resources = hardware.resources().to_wire()
        if memory is not None:
            if not re.fullmatch(QUANTITY_PATTERN, memory):
                raise typer.BadParameter(f"{memory!r} is not a size", param_hint="--memory")
            resources["memory"] = memory
        gpu = any(a["vendor"] == "nvidia" for a in resources.get("accelerators", []))
        spec = PeerNodeSpec.model_validate(
            {
                "cluster": cluster,
                "endpoint": endpoint,
                "roles": role or ["prefill", "decode"],
                "backends": backend or (["llamacpp", "vllm"] if gpu else ["llamacpp"]),
                "resources": resources,
                "network": PeerNetwork(
                    uplink_mbps=uplink_mbps, downlink_mbps=downlink_mbps, region=region
                ),
                "models": hardware.local_models(models_dir.expanduser()),
                "trustLevel": trust,
                "kvEvents": {"endpoint": kv_events, "topic": kv_events_topic}
                if kv_events
                else None,
                "rpcServer": {"endpoint": rpc_server} if rpc_server else None,
                "heartbeatTTLSeconds": heartbeat_ttl,
            }
        )
        peer = name or default_name(cluster)
        register(api, peer, spec)
        typer.echo(f"{peer} joined {cluster}")
        if once:
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            heartbeat_until(api, peer, endpoint, heartbeat_ttl / 3, stop)
        typer.echo(f"{peer} stopped heartbeating; `edgellm leave --name {peer}` removes it")


def leave(
    name: NameOption = None,
    deadline: Annotated[
        float, typer.Option(help="Seconds to wait for the peer's running requests.")
    ] = 300.0,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Drain this peer: no new requests, running ones waited for up to the deadline, then
    removed."""
    configure_logging(verbose)
    with one_line_errors():
        api = connect(kubeconfig, context)
        peer = name or default_name(local_cluster_name(api))
        departure = drain_and_leave(api, peer, deadline)
    waited = f"{peer} left after {departure.waited_seconds:.0f}s"
    if departure.abandoned:
        running = ", ".join(departure.abandoned)
        typer.echo(f"{waited} with request(s) still running: {running}", err=True)
    else:
        typer.echo(f"{waited}; no request was cut short")
