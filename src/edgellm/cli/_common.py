"""What every subcommand shares: cluster connection options and one-line errors."""

import base64
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import urllib3
import yaml
from kubernetes import client, config
from pydantic import ValidationError

from edgellm.dev.errors import ComponentFailedError, DevError
from edgellm.federation.errors import FederationError
from edgellm.federation.membership import Endpoint, local_cluster_name
from edgellm.scheduling import ProfileConfig, configured_profile

KubeconfigOption = Annotated[
    Path | None,
    typer.Option(
        envvar="KUBECONFIG",
        help="Kubeconfig of the cluster to talk to (default: $KUBECONFIG, ~/.kube/config).",
    ),
]
ContextOption = Annotated[str | None, typer.Option(help="Context of the kubeconfig to use.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")]
KVEventsTopicOption = Annotated[
    str, typer.Option(help="Topic of the KV events; empty by default, as vLLM's.")
]
SchedulerProfileOption = Annotated[
    Path | None,
    typer.Option(
        exists=True,
        dir_okay=False,
        help="YAML: filters, scorers (name: weight) and picker, by plugin name; what it"
        " leaves out keeps the default profile's.",
    ),
]


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Each retried connection is a warning there; EdgeLLM reports the failure that matters.
    logging.getLogger("urllib3").setLevel(logging.ERROR)


@contextmanager
def one_line_errors() -> Iterator[None]:
    try:
        yield
    except ComponentFailedError as e:
        typer.echo(f"edgellm: {e}", err=True)
        tail = e.log_tail()
        if tail:
            typer.echo(f"--- last lines of {e.log} ---\n{tail}", err=True)
        raise typer.Exit(1) from e
    except (DevError, FederationError) as e:
        typer.echo(f"edgellm: {e}", err=True)
        raise typer.Exit(1) from e
    except client.ApiException as e:
        typer.echo(f"edgellm: the cluster refused: {e.status} {e.reason}: {_message(e)}", err=True)
        raise typer.Exit(1) from e
    except (urllib3.exceptions.HTTPError, OSError) as e:
        typer.echo(f"edgellm: cannot reach the cluster: {e}", err=True)
        raise typer.Exit(1) from e


def load_profile(path: Path) -> ProfileConfig:
    """A scheduler profile file, checked now rather than at the first request."""
    try:
        profile = ProfileConfig.model_validate(yaml.safe_load(path.read_text()))
        configured_profile(profile)
    except (ValidationError, ValueError, yaml.YAMLError) as e:
        first = str(e).splitlines()
        typer.echo(f"edgellm: {path}: {' '.join(first[:3])}", err=True)
        raise typer.Exit(1) from e
    return profile


def _message(error: client.ApiException) -> str:
    try:
        return str(json.loads(error.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(error.body)


def connect(kubeconfig: Path | None, context: str | None) -> client.ApiClient:
    """A client for the cluster a command names; in a pod, its ServiceAccount."""
    if kubeconfig is None and not Path("~/.kube/config").expanduser().exists():
        config.load_incluster_config()
        return client.ApiClient()
    return config.new_client_from_config(
        config_file=str(kubeconfig) if kubeconfig else None, context=context
    )


def local_endpoint(api: client.ApiClient, advertise_server: str | None) -> Endpoint:
    """How other members reach the cluster behind `api`."""
    ca_file = api.configuration.ssl_ca_cert
    if not ca_file:
        raise FederationError("the kubeconfig names no certificate authority for the server")
    return Endpoint(
        cluster=local_cluster_name(api),
        server=advertise_server or api.configuration.host,
        ca_bundle=base64.b64encode(Path(ca_file).read_bytes()).decode(),
    )
