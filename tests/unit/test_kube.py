"""The thin Kubernetes layer: failures as types, and where each kind's objects are."""

import pytest
from kubernetes import client

from edgellm.api import INFERENCE_REQUEST, PEER_NODE
from edgellm.kube import APIError, ConflictError, NotFoundError, translated
from edgellm.kube.objects import INFERENCE_REQUESTS, PEER_NODES, Resource, get


@pytest.mark.parametrize(
    ("status", "kind"), [(404, NotFoundError), (409, ConflictError), (403, APIError)]
)
def test_an_api_exception_becomes_the_error_that_says_what_it_means(
    status: int, kind: type[APIError]
) -> None:
    with pytest.raises(kind) as caught, translated():
        raise client.ApiException(status=status, reason="Because")
    assert type(caught.value) is kind
    assert caught.value.status == status
    assert caught.value.reason == "Because"
    assert isinstance(caught.value.__cause__, client.ApiException)


def test_each_kind_is_found_under_the_group_version_and_plural_of_the_api() -> None:
    assert Resource("edgellm.io", "v1alpha1", PEER_NODE.plural, namespaced=False) == PEER_NODES
    assert INFERENCE_REQUESTS.namespaced
    assert INFERENCE_REQUESTS.plural == INFERENCE_REQUEST.plural == "inferencerequests"


def test_a_namespace_is_given_exactly_for_namespaced_kinds() -> None:
    api = client.ApiClient()
    with pytest.raises(ValueError, match="peernodes are not namespaced"):
        get(api, PEER_NODES, "p", "default")
    with pytest.raises(ValueError, match="inferencerequests are namespaced"):
        get(api, INFERENCE_REQUESTS, "r")
