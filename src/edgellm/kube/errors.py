"""What a Kubernetes API call's failure means, as types that say it, rather than an
`ApiException` whose status code every caller checks (kopf's `_cogs/clients/errors.py`).

    APIError           the API refused or failed the call (`status`, `reason`)
    ├── NotFoundError  404: the object, or its namespace or kind, does not exist
    └── ConflictError  409: it exists already, or changed since it was read

`translated()` turns the kubernetes client's exceptions into these, the original chained; the
verbs of `objects` use it, and so do callers of the client's other APIs (Secrets, ConfigMaps).
"""

from collections.abc import Iterator
from contextlib import contextmanager

from kubernetes import client


class APIError(Exception):
    """The Kubernetes API refused or failed a call."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class NotFoundError(APIError):
    """The object, or its namespace or kind, does not exist."""


class ConflictError(APIError):
    """The object exists already, or changed since it was read."""


_BY_STATUS: dict[int, type[APIError]] = {404: NotFoundError, 409: ConflictError}


@contextmanager
def translated() -> Iterator[None]:
    """Raises the `APIError` that says what an `ApiException` inside the block means."""
    try:
        yield
    except client.ApiException as e:
        status, reason = int(e.status or 0), str(e.reason or "")
        kind = _BY_STATUS.get(status, APIError)
        raise kind(status, reason, f"({status}) {reason}: {e.body or ''}".strip()) from e
