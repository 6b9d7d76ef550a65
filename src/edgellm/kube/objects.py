"""Custom objects through the Kubernetes API: one function per verb, names and kinds from
`edgellm.api`, failures as `errors.APIError`s (as kopf's `_cogs/clients/patching.py` and
`fetching.py`).

The operator, the router's peer directory, worker registration, the federation's membership
and the tests call these rather than `CustomObjectsApi`, so that the group, version and plural
of a kind are spelled in one place and a missing object is a `NotFoundError`. Every call is
synchronous (the client is); `timeout` bounds one call, in seconds, where a remote member may
not answer.
"""

from dataclasses import dataclass
from typing import Any

from kubernetes import client

from edgellm.api import (
    FEDERATION_MEMBER,
    GROUP,
    INFERENCE_REQUEST,
    PEER_NODE,
    VERSION,
    WORKER_POOL,
    ResourceKind,
)
from edgellm.kube.errors import translated

Body = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """Where a kind's objects are: group, version, plural and whether they are namespaced."""

    group: str
    version: str
    plural: str
    namespaced: bool

    @classmethod
    def of(cls, kind: ResourceKind) -> "Resource":
        return cls(GROUP, VERSION, kind.plural, kind.namespaced)


PEER_NODES = Resource.of(PEER_NODE)
FEDERATION_MEMBERS = Resource.of(FEDERATION_MEMBER)
INFERENCE_REQUESTS = Resource.of(INFERENCE_REQUEST)
WORKER_POOLS = Resource.of(WORKER_POOL)


def _place(resource: Resource, namespace: str | None) -> tuple[str, ...]:
    """The path arguments before the plural: group, version and, when namespaced, namespace."""
    if resource.namespaced != (namespace is not None):
        raise ValueError(f"{resource.plural} are {'' if resource.namespaced else 'not '}namespaced")
    return (resource.group, resource.version, *((namespace,) if namespace else ()))


def _options(timeout: float | None) -> dict[str, Any]:
    return {} if timeout is None else {"_request_timeout": timeout}


def _objects(api: client.ApiClient, resource: Resource, verb: str) -> Any:
    """The `CustomObjectsApi` method for `verb` on namespaced or cluster-wide objects."""
    scope = "namespaced" if resource.namespaced else "cluster"
    return getattr(client.CustomObjectsApi(api), verb.format(scope=scope))


def get(
    api: client.ApiClient,
    resource: Resource,
    name: str,
    namespace: str | None = None,
    *,
    timeout: float | None = None,
) -> Body:
    call = _objects(api, resource, "get_{scope}_custom_object")
    with translated():
        found: Body = call(*_place(resource, namespace), resource.plural, name, **_options(timeout))
    return found


def list_objects(
    api: client.ApiClient,
    resource: Resource,
    namespace: str | None = None,
    *,
    label_selector: str | None = None,
    timeout: float | None = None,
) -> list[Body]:
    """The objects, of every namespace when the kind is namespaced and `namespace` is None."""
    options = _options(timeout) | ({"label_selector": label_selector} if label_selector else {})
    objects = client.CustomObjectsApi(api)
    with translated():
        if resource.namespaced and namespace is None:
            listed = objects.list_cluster_custom_object(
                resource.group, resource.version, resource.plural, **options
            )
        else:
            call = _objects(api, resource, "list_{scope}_custom_object")
            listed = call(*_place(resource, namespace), resource.plural, **options)
    return list(listed["items"])


def create(
    api: client.ApiClient,
    resource: Resource,
    body: Body,
    *,
    timeout: float | None = None,
) -> Body:
    """Creates `body` (its namespace from its metadata); ConflictError when it exists."""
    namespace = body["metadata"].get("namespace") if resource.namespaced else None
    call = _objects(api, resource, "create_{scope}_custom_object")
    with translated():
        created: Body = call(
            *_place(resource, namespace), resource.plural, body, **_options(timeout)
        )
    return created


def replace(
    api: client.ApiClient,
    resource: Resource,
    body: Body,
    *,
    timeout: float | None = None,
) -> Body:
    """Replaces the object `body` names with `body`."""
    metadata = body["metadata"]
    namespace = metadata.get("namespace") if resource.namespaced else None
    call = _objects(api, resource, "replace_{scope}_custom_object")
    with translated():
        replaced: Body = call(
            *_place(resource, namespace),
            resource.plural,
            metadata["name"],
            body,
            **_options(timeout),
        )
    return replaced


def patch(
    api: client.ApiClient,
    resource: Resource,
    name: str,
    body: Body,
    namespace: str | None = None,
    *,
    timeout: float | None = None,
) -> Body:
    """A JSON merge patch of the object (its spec or metadata)."""
    call = _objects(api, resource, "patch_{scope}_custom_object")
    with translated():
        patched: Body = call(
            *_place(resource, namespace), resource.plural, name, body, **_options(timeout)
        )
    return patched


def patch_status(
    api: client.ApiClient,
    resource: Resource,
    name: str,
    status: Body,
    namespace: str | None = None,
    *,
    timeout: float | None = None,
) -> Body:
    """A JSON merge patch of the object's status, through its status subresource."""
    call = _objects(api, resource, "patch_{scope}_custom_object_status")
    with translated():
        patched: Body = call(
            *_place(resource, namespace),
            resource.plural,
            name,
            {"status": status},
            **_options(timeout),
        )
    return patched


def delete(
    api: client.ApiClient,
    resource: Resource,
    name: str,
    namespace: str | None = None,
    *,
    timeout: float | None = None,
) -> None:
    """Deletes the object; NotFoundError when it is gone already."""
    call = _objects(api, resource, "delete_{scope}_custom_object")
    with translated():
        call(*_place(resource, namespace), resource.plural, name, **_options(timeout))
