"""What a call to a worker can end in, by what the caller should do next (the shape of kopf's
`_cogs/clients/errors.py`): the HTTP client's own exceptions never leave `WorkerClient`.

    WorkerError              a worker did not give what was asked
    ├── WorkerRefusedError   the worker refused the request itself (a 4xx, e.g. a prompt too
    │                        long for the model): another worker would too, so the request fails
    ├── WorkerFailedError    the worker broke off: unreachable, a 5xx, an error event, a stream
    │   │                    cut short; another worker may go on from the text so far
    │   └── StagesLostError  a split's leading worker lost the stages at `endpoints`: plan again
    │                        without their peers; the leader itself still serves
    └── ClientBusyError      every connection of the calling client is in use: the caller itself
                             is saturated, and no worker is to blame
"""


class WorkerError(Exception):
    """A call to a worker did not give what was asked."""


class WorkerRefusedError(WorkerError):
    """The worker refused the request itself, with `status`; another worker would too."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class WorkerFailedError(WorkerError):
    """The worker broke off; another worker may go on from the text so far."""


class StagesLostError(WorkerFailedError):
    """The stages of a split model at `endpoints` (host:port of their RPC servers) stopped
    answering; the leading worker itself still serves."""

    def __init__(self, endpoints: list[str], message: str | None = None) -> None:
        super().__init__(message or f"the split lost its stage(s) {', '.join(endpoints)}")
        self.endpoints = endpoints


class ClientBusyError(WorkerError):
    """Every connection of the calling client is in use."""
