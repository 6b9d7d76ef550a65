"""Kubernetes API clients built from kubeconfig data, CRD installation and server-side apply,
for the operator's own calls, the CLI, local clusters, federation clients and tests."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kubernetes import client, config
from kubernetes.dynamic import DynamicClient

from edgellm.kube.errors import NotFoundError, translated


def new_api_client(kubeconfig: dict[str, Any], context: str | None = None) -> client.ApiClient:
    """A client for one context of a kubeconfig held in memory; the caller closes it."""
    configuration = client.Configuration()
    config.load_kube_config_from_dict(
        kubeconfig, context=context, client_configuration=configuration, persist_config=False
    )
    return client.ApiClient(configuration)


@contextmanager
def api_client(
    kubeconfig: dict[str, Any], context: str | None = None
) -> Iterator[client.ApiClient]:
    """A client for one context of a kubeconfig held in memory; closed on exit."""
    api = new_api_client(kubeconfig, context)
    try:
        yield api
    finally:
        api.close()


def install_crds(api: client.ApiClient, crds: list[dict[str, Any]], timeout: float = 60.0) -> None:
    """Creates or replaces each CRD and waits until the apiserver reports it Established."""
    extensions = client.ApiextensionsV1Api(api)
    for crd in crds:
        name = crd["metadata"]["name"]
        try:
            with translated():
                current = extensions.read_custom_resource_definition(name)
        except NotFoundError:
            extensions.create_custom_resource_definition(crd)
        else:
            crd = {
                **crd,
                "metadata": {
                    **crd["metadata"],
                    "resourceVersion": current.metadata.resource_version,
                },
            }
            extensions.replace_custom_resource_definition(name, crd)
    deadline = time.monotonic() + timeout
    for crd in crds:
        name = crd["metadata"]["name"]
        while not _established(extensions.read_custom_resource_definition(name)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} was not Established within {timeout:.0f}s")
            time.sleep(0.2)


def _established(crd: Any) -> bool:
    return any(
        c.type == "Established" and c.status == "True" for c in (crd.status.conditions or [])
    )


def apply(
    api: client.ApiClient, manifests: list[dict[str, Any]], manager: str = "edgellm"
) -> list[dict[str, Any]]:
    """Server-side applies each manifest: created when absent, brought to this shape otherwise.
    Returns the objects as the apiserver stored them."""
    dynamic = DynamicClient(api)
    applied = []
    for manifest in manifests:
        resource = dynamic.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
        result = dynamic.server_side_apply(
            resource,
            body=manifest,
            name=manifest["metadata"]["name"],
            namespace=manifest["metadata"].get("namespace"),
            field_manager=manager,
            force_conflicts=True,
        )
        applied.append(result.to_dict())
    return applied
