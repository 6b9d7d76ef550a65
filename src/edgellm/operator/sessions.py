"""Which peer holds each session's KV, while the session is warm.

Requests that name one session go back to the peer that served its last turn, so the prompt's
shared prefix is not computed again; a session idle longer than its TTL is forgotten and its
next turn goes wherever the scheduler likes. In memory: an operator restart costs one cold turn.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class _Warm:
    peer: str
    until: float


class SessionTable:
    def __init__(self) -> None:
        self._sessions: dict[str, _Warm] = {}

    def peer(self, key: str, now: float) -> str | None:
        """The peer of a warm session, or None."""
        warm = self._sessions.get(key)
        if warm is None or warm.until < now:
            self._sessions.pop(key, None)
            return None
        return warm.peer

    def served(self, key: str, peer: str, idle_ttl: float, now: float) -> None:
        self._sessions[key] = _Warm(peer, now + idle_ttl)
        # Expired sessions go when their key comes back; this bounds the ones that never do.
        for stale in [k for k, w in self._sessions.items() if w.until < now]:
            del self._sessions[stale]
