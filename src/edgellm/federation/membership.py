"""Join tokens, and the credential exchange that makes two clusters members of each other.

`edgellm federation token create/revoke` and `edgellm federation join` call these on behalf of
an admin; the operators call `introduce` to spread membership to every member. Every call is a
plain Kubernetes API call on a client given by the caller (sync; the operator runs them in a
thread), so each is testable against a real apiserver.
"""

import base64
import binascii
import contextlib
import secrets
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from pydantic import BaseModel, ValidationError

from edgellm.api import API_VERSION
from edgellm.federation.errors import InvalidJoinTokenError, JoinRefusedError, NotInitializedError
from edgellm.federation.rbac import (
    FEDERATION_NAMESPACE,
    IDENTITY_CONFIGMAP,
    JOIN_NAMESPACE,
    credentials_secret,
    member_service_account,
)
from edgellm.kube import APIError, ConflictError, NotFoundError, objects, translated

TOKEN_PREFIX = "edgellm-join-v1."
MEMBER_TOKEN_SECONDS = 365 * 24 * 3600


class Endpoint(BaseModel):
    """How to reach one cluster's kube-apiserver."""

    cluster: str
    server: str
    ca_bundle: str  # base64 PEM, as in kubeconfigs and FederationMember.spec.caBundle


class JoinToken(Endpoint):
    """What a new member needs to register with an existing one: its endpoint and a token."""

    token: str

    def encode(self) -> str:
        return TOKEN_PREFIX + base64.urlsafe_b64encode(self.model_dump_json().encode()).decode()

    @classmethod
    def decode(cls, text: str) -> "JoinToken":
        if not text.startswith(TOKEN_PREFIX):
            raise InvalidJoinTokenError(f"a join token starts with {TOKEN_PREFIX!r}")
        try:
            return cls.model_validate_json(base64.urlsafe_b64decode(text[len(TOKEN_PREFIX) :]))
        except (binascii.Error, ValidationError, ValueError) as e:
            raise InvalidJoinTokenError("the join token is damaged: copy it again") from e


def token_kubeconfig(endpoint: Endpoint, token: str) -> dict[str, Any]:
    """A kubeconfig that reaches `endpoint` with a bearer token."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": endpoint.cluster,
                "cluster": {
                    "server": endpoint.server,
                    "certificate-authority-data": endpoint.ca_bundle,
                },
            }
        ],
        "users": [{"name": "edgellm", "user": {"token": token}}],
        "contexts": [
            {"name": endpoint.cluster, "context": {"cluster": endpoint.cluster, "user": "edgellm"}}
        ],
        "current-context": endpoint.cluster,
    }


def local_cluster_name(api: client.ApiClient) -> str:
    """This cluster's name in the federation, from `edgellm federation init`."""
    try:
        with translated():
            identity = client.CoreV1Api(api).read_namespaced_config_map(
                IDENTITY_CONFIGMAP, FEDERATION_NAMESPACE
            )
    except NotFoundError as e:
        raise NotInitializedError(
            "this cluster has no federation identity: run `edgellm federation init`"
        ) from e
    return str(identity.data["cluster"])


def _service_account_token(api: client.ApiClient, namespace: str, name: str, seconds: int) -> str:
    core = client.CoreV1Api(api)
    with contextlib.suppress(ConflictError), translated():
        core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    request = {"spec": {"expirationSeconds": seconds}}
    return str(core.create_namespaced_service_account_token(name, namespace, request).status.token)


def _member_token(api: client.ApiClient, member: str) -> str:
    account = member_service_account(member)
    return _service_account_token(api, FEDERATION_NAMESPACE, account, MEMBER_TOKEN_SECONDS)


def create_join_token(
    api: client.ApiClient, endpoint: Endpoint, ttl_seconds: int
) -> tuple[str, JoinToken]:
    """A token that lets one cluster join, valid for `ttl_seconds` or until revoked, and its id
    for `revoke_join_token`."""
    token_id = f"join-{secrets.token_hex(4)}"
    token = _service_account_token(api, JOIN_NAMESPACE, token_id, ttl_seconds)
    return token_id, JoinToken(**endpoint.model_dump(), token=token)


def list_join_tokens(api: client.ApiClient) -> list[str]:
    accounts = client.CoreV1Api(api).list_namespaced_service_account(JOIN_NAMESPACE).items
    return sorted(a.metadata.name for a in accounts if a.metadata.name.startswith("join-"))


def revoke_join_token(api: client.ApiClient, token_id: str) -> None:
    """Deleting the ServiceAccount invalidates every token it issued."""
    try:
        with translated():
            client.CoreV1Api(api).delete_namespaced_service_account(token_id, JOIN_NAMESPACE)
    except NotFoundError as e:
        raise JoinRefusedError(f"no join token {token_id!r}") from e


@dataclass(frozen=True)
class Member:
    """A cluster and a client that may write to it (an admin's or a member credential)."""

    endpoint: Endpoint
    api: client.ApiClient


def _store_credential(at: Member, reach: Endpoint, token: str) -> None:
    """In `at`: the token for reaching `reach`, and a FederationMember that points at it."""
    core = client.CoreV1Api(at.api)
    name = credentials_secret(reach.cluster)
    secret = {
        "metadata": {"name": name, "labels": {"edgellm.io/member": reach.cluster}},
        "type": "Opaque",
        "stringData": {"token": token},
    }
    try:
        with translated():
            core.create_namespaced_secret(FEDERATION_NAMESPACE, secret)
    except ConflictError:
        core.replace_namespaced_secret(name, FEDERATION_NAMESPACE, secret)
    member = {
        "apiVersion": API_VERSION,
        "kind": "FederationMember",
        "metadata": {"name": reach.cluster},
        "spec": {"server": reach.server, "caBundle": reach.ca_bundle, "credentialsSecret": name},
    }
    with contextlib.suppress(ConflictError):
        objects.create(at.api, objects.FEDERATION_MEMBERS, member)


def introduce(a: Member, b: Member) -> None:
    """Makes `a` and `b` members of each other: each gets a ServiceAccount for the other to use,
    and stores the token it was given for the other."""
    a_reaches_b = _service_account_token(
        b.api,
        FEDERATION_NAMESPACE,
        member_service_account(a.endpoint.cluster),
        MEMBER_TOKEN_SECONDS,
    )
    b_reaches_a = _service_account_token(
        a.api,
        FEDERATION_NAMESPACE,
        member_service_account(b.endpoint.cluster),
        MEMBER_TOKEN_SECONDS,
    )
    _store_credential(a, b.endpoint, a_reaches_b)
    _store_credential(b, a.endpoint, b_reaches_a)


def check_join(joiner: Member, existing: Member) -> None:
    """Refuses, before anything is written, a token the member rejects or a name clash."""
    try:
        with translated():
            client.AuthenticationV1Api(existing.api).create_self_subject_review(
                {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
            )
    except APIError as e:
        if e.status == 401:
            raise JoinRefusedError(
                f"{existing.endpoint.cluster} refused the join token: it is wrong, expired or"
                " revoked; ask a member for a new one"
            ) from e
        raise
    if joiner.endpoint.cluster == existing.endpoint.cluster:
        raise JoinRefusedError(
            f"both clusters are named {joiner.endpoint.cluster!r}: names must be unique"
        )
    try:
        objects.get(existing.api, objects.FEDERATION_MEMBERS, joiner.endpoint.cluster)
    except NotFoundError:
        return
    raise JoinRefusedError(
        f"{existing.endpoint.cluster} already has a member named {joiner.endpoint.cluster!r}"
    )
