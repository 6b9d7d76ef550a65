"""The Kubernetes API as EdgeLLM calls it: clients from kubeconfig data, CRD installation and
server-side apply (`clients`), custom objects by verb (`objects`), and failures as types
(`errors`). Imports only `edgellm.api`; every package that talks to a cluster imports this.
"""

from edgellm.kube.clients import api_client, apply, install_crds, new_api_client
from edgellm.kube.errors import APIError, ConflictError, NotFoundError, translated

__all__ = [
    "APIError",
    "ConflictError",
    "NotFoundError",
    "api_client",
    "apply",
    "install_crds",
    "new_api_client",
    "translated",
]
