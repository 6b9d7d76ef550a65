"""Calling workers: their HTTP API as pydantic models (`protocol`), the one client that speaks
it (`client`), what a call can end in (`errors`), and the attempt loop that runs a request on
workers until one finishes it (`attempts`).

Between the engines and their callers: the worker's server (`edgellm.worker`) answers in these
models, and the router, the operator and split leaders call through `WorkerClient`.
"""

from edgellm.workerapi.attempts import (
    Hooks,
    Job,
    Outcome,
    OutOfAttemptsError,
    Piece,
    Placement,
    Progress,
    attempts,
    estimated_tokens,
)
from edgellm.workerapi.client import Finished, FinishReason, Text, WorkerClient
from edgellm.workerapi.errors import (
    ClientBusyError,
    StagesLostError,
    WorkerError,
    WorkerFailedError,
    WorkerRefusedError,
)

__all__ = [
    "ClientBusyError",
    "FinishReason",
    "Finished",
    "Hooks",
    "Job",
    "OutOfAttemptsError",
    "Outcome",
    "Piece",
    "Placement",
    "Progress",
    "StagesLostError",
    "Text",
    "WorkerClient",
    "WorkerError",
    "WorkerFailedError",
    "WorkerRefusedError",
    "attempts",
    "estimated_tokens",
]
