"""`edgellm operator`: the kopf operator of one member cluster."""

from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError

from edgellm.cli._common import VerboseOption, configure_logging
from edgellm.operator.app import run
from edgellm.operator.settings import OperatorSettings
from edgellm.scheduling import ProfileConfig, configured_profile


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
        float, typer.Option(help="Seconds between sizings of every WorkerPool to its demand.")
    ] = 5.0,
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
    scheduler_profile: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="YAML: filters, scorers (name: weight) and picker, by plugin name; what it"
            " leaves out keeps the default profile's.",
        ),
    ] = None,
    metrics_port: Annotated[
        int, typer.Option(help="Prometheus /metrics port; 0 turns it off.")
    ] = 9090,
    verbose: VerboseOption = False,
) -> None:
    """Run the operator: peer health, Nodes as peers, federation membership and mirroring,
    requests and worker pools."""
    configure_logging(verbose)
    profile = None
    if scheduler_profile is not None:
        try:
            profile = ProfileConfig.model_validate(yaml.safe_load(scheduler_profile.read_text()))
            configured_profile(profile)  # refuses unknown plugins now, not at the first request
        except (ValidationError, ValueError, yaml.YAMLError) as e:
            first = str(e).splitlines()
            typer.echo(f"edgellm: {scheduler_profile}: {' '.join(first[:3])}", err=True)
            raise typer.Exit(1) from e
    run(
        OperatorSettings(
            cluster=cluster,
            kubeconfig=kubeconfig,
            peer_removal_grace_seconds=peer_removal_grace,
            sync_interval_seconds=sync_interval,
            pool_interval_seconds=pool_interval,
            inline_output_limit_bytes=inline_output_limit,
            kv_hash_seed=kv_hash_seed,
            scheduler_profile=profile,
            metrics_port=metrics_port,
        )
    )
