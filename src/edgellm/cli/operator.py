"""`edgellm operator`: the kopf operator of one member cluster."""

from pathlib import Path
from typing import Annotated

import typer

from edgellm.cli._common import (
    SchedulerProfileOption,
    VerboseOption,
    configure_logging,
    load_profile,
)
from edgellm.operator.app import run
from edgellm.operator.settings import OperatorSettings
from edgellm.operator.workerpools import DEFAULT_IMAGE as DEFAULT_WORKER_IMAGE


def run_operator(
    cluster: Annotated[str, typer.Option(help="This cluster's name in the federation.")],
    kubeconfig: Annotated[
        Path | None,
        typer.Option(envvar="KUBECONFIG", help="This cluster's kubeconfig (default: in-cluster)."),
    ] = None,
    peer_removal_grace: Annotated[
        float, typer.Option(help="Seconds a peer with an expired heartbeat stays before removal.")
    ] = 300.0,
    sync_interval: Annotated[
        float, typer.Option(help="Seconds between probes and mirror syncs of each member.")
    ] = 5.0,
    pool_interval: Annotated[
        float,
        typer.Option(
            help="Seconds between sizings of every WorkerPool to its demand (and heartbeats of"
            " its workers' peers)."
        ),
    ] = 5.0,
    worker_image: Annotated[
        str, typer.Option(help="Image of the WorkerPools' workers that name none.")
    ] = DEFAULT_WORKER_IMAGE,
    inline_output_limit: Annotated[
        int,
        typer.Option(help="Bytes of output kept in a request's status; more go to a ConfigMap."),
    ] = 16384,
    kv_hash_seed: Annotated[
        str,
        typer.Option(
            envvar="PYTHONHASHSEED", help="The workers' --hash-seed, for KV block hashes."
        ),
    ] = "0",
    scheduler_profile: SchedulerProfileOption = None,
    metrics_port: Annotated[
        int, typer.Option(help="Prometheus /metrics port; 0 turns it off.")
    ] = 9090,
    peering: Annotated[
        str | None,
        typer.Option(
            help="Join this ClusterKopfPeering (it must exist): of the operators in it, the one"
            " started first works and the others stand by to take over. Default: standalone."
        ),
    ] = None,
    peering_lifetime: Annotated[
        int,
        typer.Option(
            min=5,
            help="Seconds before the others of the peering take over from this operator when it"
            " stops without a word (killed, its node lost).",
        ),
    ] = 15,
    verbose: VerboseOption = False,
) -> None:
    """Run the operator: peer health, Nodes as peers, federation membership and mirroring,
    requests and worker pools."""
    configure_logging(verbose)
    profile = None if scheduler_profile is None else load_profile(scheduler_profile)
    run(
        OperatorSettings(
            cluster=cluster,
            kubeconfig=kubeconfig,
            peer_removal_grace_seconds=peer_removal_grace,
            sync_interval_seconds=sync_interval,
            pool_interval_seconds=pool_interval,
            worker_image=worker_image,
            inline_output_limit_bytes=inline_output_limit,
            kv_hash_seed=kv_hash_seed,
            scheduler_profile=profile,
            metrics_port=metrics_port,
            peering=peering,
            peering_lifetime_seconds=peering_lifetime,
        )
    )
