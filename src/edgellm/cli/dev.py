"""`edgellm dev up/down/status`: local clusters on this machine."""

from pathlib import Path
from typing import Annotated

import typer
import yaml

from edgellm.api import KINDS, custom_resource_definition
from edgellm.cli._common import one_line_errors
from edgellm.dev.federation import LocalFederation, default_workdir
from edgellm.federation.rbac import federation_manifests
from edgellm.kube import api_client, apply, install_crds

app = typer.Typer(
    help="Local clusters on this machine: real control planes on loopback, KWOK's fake nodes.",
    no_args_is_help=True,
)

DEFAULT_WORKDIR = default_workdir()
WorkdirOption = Annotated[
    Path,
    typer.Option(help="Where the clusters keep certificates, data, logs and the kubeconfig."),
]


@app.command("up")
def up(
    clusters: Annotated[int, typer.Option(min=1, max=9, help="How many clusters.")] = 1,
    workdir: WorkdirOption = DEFAULT_WORKDIR,
    timeout: Annotated[float, typer.Option(help="Seconds each cluster may take to start.")] = 300,
    real_node: Annotated[
        bool,
        typer.Option(
            help="Give the first cluster a real node (containerd, runc, kubelet, kube-proxy) whose"
            " pods run, with the images `make images` built; KWOK's nodes are then tainted."
            " Needs root.",
        ),
    ] = False,
    install: Annotated[
        bool,
        typer.Option(
            "--crds/--no-crds",
            help="Install EdgeLLM's CRDs and federation roles (`federation init`) in each.",
        ),
    ] = True,
) -> None:
    """Start local clusters, each with its own etcd, kube-apiserver, controller manager,
    scheduler and KWOK fake nodes (one with a GPU), and optionally a real node; print the
    kubeconfig's path."""
    federation = LocalFederation(workdir)
    with one_line_errors():
        kubeconfig = federation.up(clusters, timeout, progress=typer.echo, real_node=real_node)
        if install:
            definitions = [custom_resource_definition(k) for k in KINDS]
            for cluster in federation.clusters:
                with api_client(cluster.kubeconfig("admin")) as api:
                    install_crds(api, definitions)
                    apply(api, federation_manifests(cluster.name))
                typer.echo(f"{cluster.name}: CRDs installed, federation initialised")
    typer.echo(f"{clusters} cluster(s) up; use them with:\n  export KUBECONFIG={kubeconfig}")


@app.command("down")
def down(workdir: WorkdirOption = DEFAULT_WORKDIR) -> None:
    """Stop every process of the local clusters."""
    with one_line_errors():
        LocalFederation(workdir).down()
    typer.echo("local clusters stopped")


@app.command("status")
def status(workdir: WorkdirOption = DEFAULT_WORKDIR) -> None:
    """Show each local cluster's API server, running components and their memory."""
    with one_line_errors():
        federation = LocalFederation(workdir)
        for cluster in federation.clusters:
            memory = cluster.memory_mib()
            running = {c: f"{mib:.0f} MiB" for c, mib in memory.items()}
            summary = {
                "server": cluster.server,
                "running": running,
                "memory": f"{sum(memory.values()):.0f} MiB",
            }
            typer.echo(yaml.safe_dump({cluster.name: summary}, sort_keys=False).rstrip())
        typer.echo(f"kubeconfig: {federation.kubeconfig_path}")
