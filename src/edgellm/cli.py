"""The `edgellm` command line: one entry point, a subcommand per job.

Each subcommand is a thin shell over a package function. Expected failures become one readable
line on stderr (plus a log tail where a process failed) and exit code 1.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import yaml

from edgellm.api import KINDS, crd_files, custom_resource_definition
from edgellm.dev.errors import ComponentFailedError, DevError
from edgellm.dev.federation import LocalFederation, default_workdir
from edgellm.kube import api_client, install_crds

app = typer.Typer(
    help="EdgeLLM: decentralised LLM inference over a federation of Kubernetes clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dev = typer.Typer(
    help="Local clusters on this machine: real control planes on loopback, KWOK's fake nodes.",
    no_args_is_help=True,
)
app.add_typer(dev, name="dev")

DEFAULT_CRD_DIRS = [Path("crds"), Path("charts/edgellm/crds")]
DEFAULT_WORKDIR = default_workdir()

WorkdirOption = Annotated[
    Path,
    typer.Option(help="Where the clusters keep certificates, data, logs and the kubeconfig."),
]


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except ComponentFailedError as e:
        typer.echo(f"edgellm: {e}", err=True)
        tail = e.log_tail()
        if tail:
            typer.echo(f"--- last lines of {e.log} ---\n{tail}", err=True)
        raise typer.Exit(1) from e
    except DevError as e:
        typer.echo(f"edgellm: {e}", err=True)
        raise typer.Exit(1) from e


@app.command()
def crds(
    out: Annotated[
        list[Path] | None, typer.Option(help="Directory to write into; repeatable.")
    ] = None,
    check: Annotated[
        bool, typer.Option(help="Write nothing; fail if the files differ from the models.")
    ] = False,
) -> None:
    """Write the CRD YAML generated from the API models (crds/ and the Helm chart)."""
    stale = []
    for directory in out or DEFAULT_CRD_DIRS:
        for name, text in crd_files().items():
            path = directory / name
            current = path.read_text() if path.exists() else None
            if current == text:
                continue
            if check:
                stale.append(str(path))
            else:
                directory.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                typer.echo(f"wrote {path}")
    if stale:
        typer.echo(
            f"edgellm: CRDs differ from the models: {', '.join(stale)}; run `edgellm crds`",
            err=True,
        )
        raise typer.Exit(1)


@dev.command("up")
def dev_up(
    clusters: Annotated[int, typer.Option(min=1, max=9, help="How many clusters.")] = 1,
    workdir: WorkdirOption = DEFAULT_WORKDIR,
    timeout: Annotated[float, typer.Option(help="Seconds each cluster may take to start.")] = 300,
    install_crds_: Annotated[
        bool, typer.Option("--crds/--no-crds", help="Install EdgeLLM's CRDs in every cluster.")
    ] = True,
) -> None:
    """Start local clusters, each with its own etcd, kube-apiserver, controller manager,
    scheduler and KWOK fake nodes (one with a GPU); print the kubeconfig's path."""
    federation = LocalFederation(workdir)
    with _one_line_errors():
        kubeconfig = federation.up(clusters, timeout, progress=typer.echo)
        if install_crds_:
            definitions = [custom_resource_definition(k) for k in KINDS]
            for cluster in federation.clusters:
                with api_client(cluster.kubeconfig("admin")) as api:
                    install_crds(api, definitions)
                typer.echo(f"{cluster.name}: CRDs installed")
    typer.echo(f"{clusters} cluster(s) up; use them with:\n  export KUBECONFIG={kubeconfig}")


@dev.command("down")
def dev_down(workdir: WorkdirOption = DEFAULT_WORKDIR) -> None:
    """Stop every process of the local clusters."""
    with _one_line_errors():
        LocalFederation(workdir).down()
    typer.echo("local clusters stopped")


@dev.command("status")
def dev_status(workdir: WorkdirOption = DEFAULT_WORKDIR) -> None:
    """Show each local cluster's API server, running components and their memory."""
    with _one_line_errors():
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


def main() -> None:
    app()
