"""Errors of the federation.

FederationError
├── InvalidJoinTokenError   the token cannot be parsed
├── JoinRefusedError        the member refused the token (wrong, expired or revoked)
└── NotInitializedError     the cluster has no federation identity yet
"""


class FederationError(Exception):
    """A federation operation failed; the message says what to do."""


class InvalidJoinTokenError(FederationError):
    pass


class JoinRefusedError(FederationError):
    pass


class NotInitializedError(FederationError):
    pass
