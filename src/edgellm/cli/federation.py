"""`edgellm federation ...`: make this cluster a member of a federation, and let others join."""

from typing import Annotated

import typer

from edgellm.cli._common import (
    ContextOption,
    KubeconfigOption,
    connect,
    local_endpoint,
    one_line_errors,
)
from edgellm.federation.errors import FederationError, NotInitializedError
from edgellm.federation.membership import (
    JoinToken,
    Member,
    check_join,
    create_join_token,
    introduce,
    list_join_tokens,
    local_cluster_name,
    revoke_join_token,
    token_kubeconfig,
)
from edgellm.federation.rbac import federation_manifests
from edgellm.kube import api_client, apply

app = typer.Typer(help="Membership of a federation of clusters.", no_args_is_help=True)
tokens = typer.Typer(
    help="Join tokens: how a new cluster joins through this one.", no_args_is_help=True
)
app.add_typer(tokens, name="token")

AdvertiseOption = Annotated[
    str | None,
    typer.Option(
        help="This cluster's apiserver URL as other members reach it (default: the kubeconfig's)."
    ),
]


@app.command()
def init(
    cluster: Annotated[str, typer.Option(help="This cluster's name, unique in the federation.")],
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
) -> None:
    """Name this cluster and install the roles that scope what members and join tokens may do."""
    with one_line_errors():
        api = connect(kubeconfig, context)
        try:
            named = local_cluster_name(api)
        except NotInitializedError:
            named = cluster
        if named != cluster:
            raise FederationError(f"this cluster is already named {named!r} in its federation")
        apply(api, federation_manifests(cluster))
    typer.echo(f"{cluster}: ready to join or be joined")


@tokens.command("create")
def create_token(
    ttl: Annotated[int, typer.Option(min=60, help="Seconds the token stays valid.")] = 3600,
    advertise_server: AdvertiseOption = None,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
) -> None:
    """Print a token with which one cluster can join (its id goes to stderr, for revoking)."""
    with one_line_errors():
        api = connect(kubeconfig, context)
        token_id, token = create_join_token(api, local_endpoint(api, advertise_server), ttl)
    revoke = f"edgellm federation token revoke {token_id}"
    typer.echo(f"join token {token_id}, valid {ttl}s; revoke with `{revoke}`", err=True)
    typer.echo(token.encode())


@tokens.command("list")
def list_tokens(kubeconfig: KubeconfigOption = None, context: ContextOption = None) -> None:
    """List the ids of the join tokens not yet revoked."""
    with one_line_errors():
        for token_id in list_join_tokens(connect(kubeconfig, context)):
            typer.echo(token_id)


@tokens.command("revoke")
def revoke_token(
    token_id: Annotated[str, typer.Argument(help="The id `token create` printed.")],
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
) -> None:
    """Revoke a join token: it stops working at once."""
    with one_line_errors():
        revoke_join_token(connect(kubeconfig, context), token_id)
    typer.echo(f"join token {token_id} revoked")


@app.command()
def join(
    token: Annotated[str, typer.Argument(help="A join token from any member.")],
    advertise_server: AdvertiseOption = None,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
) -> None:
    """Join this cluster to the federation of the member that issued the token."""
    with one_line_errors():
        invitation = JoinToken.decode(token)
        api = connect(kubeconfig, context)
        joiner = Member(local_endpoint(api, advertise_server), api)
        with api_client(token_kubeconfig(invitation, invitation.token)) as remote:
            existing = Member(invitation, remote)
            check_join(joiner, existing)
            introduce(joiner, existing)
    typer.echo(
        f"{joiner.endpoint.cluster} joined {invitation.cluster}; the operators spread"
        " membership to the other members"
    )
