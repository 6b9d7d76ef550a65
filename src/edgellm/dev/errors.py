"""Errors of the local development clusters.

DevError
├── MissingToolError        a pinned binary is not in the cache
├── ComponentFailedError    a control-plane process exited or never became healthy
└── ClusterStateError       the work directory holds no (or a broken) cluster
"""

from pathlib import Path


class DevError(Exception):
    """Something about the local clusters went wrong; the message says what to do."""


class MissingToolError(DevError):
    pass


class ComponentFailedError(DevError):
    def __init__(self, cluster: str, component: str, reason: str, log: Path) -> None:
        self.cluster, self.component, self.log = cluster, component, log
        super().__init__(f"{cluster}: {component} {reason} (log: {log})")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class StartCancelledError(DevError):
    pass


class ClusterStateError(DevError):
    pass
