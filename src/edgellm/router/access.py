"""Who may call the router, and how often: API keys from a Secret, a rate limit per key.

The Secret maps a key's name (who it was given to) to the key itself, one data entry each;
`kubectl create secret generic edgellm-router-api-keys --from-literal=alice=sk-...` adds one.
Names, never keys, appear in logs and in the limiter. Rate limits use `limits` (a moving window,
kept by the maintainer of flask-limiter) rather than a hand-written bucket.
"""

import base64
import hashlib
import math
import time
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from limits import parse, storage, strategies

from edgellm.workerapi.protocol import error_response


@dataclass(frozen=True)
class Denied:
    status: int
    message: str
    code: str
    retry_after: int | None = None

    def response(self) -> JSONResponse:
        """The refusal in OpenAI's shape."""
        kind = "rate_limit_error" if self.status == 429 else "authentication_error"
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return error_response(self.status, self.message, kind, code=self.code, headers=headers)


def _digest(key: str) -> bytes:
    # Looked up by digest, so a lookup's time does not depend on how much of a key matched.
    return hashlib.sha256(key.encode()).digest()


class Access:
    def __init__(self, rate_limit: str = "600/minute", anonymous: bool = False) -> None:
        """`rate_limit` per key, in `limits`' notation ("10/second", "600/minute");
        `anonymous` lets requests without a valid key through (a laptop), under one limit."""
        self.limit = parse(rate_limit)
        self.anonymous = anonymous
        self._limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        self._names: dict[bytes, str] = {}

    def set_secret(self, data: dict[str, str] | None) -> None:
        """The keys are a Secret's data (base64 values, as the API returns them)."""
        self._names = {
            _digest(base64.b64decode(value).decode().strip()): name
            for name, value in (data or {}).items()
        }

    def check(self, authorization: str | None) -> str | Denied:
        """The caller's key name, or why it is turned away."""
        scheme, _, key = (authorization or "").partition(" ")
        given = key.strip() if scheme.lower() == "bearer" else ""
        name = self._names.get(_digest(given)) if given else None
        if name is None and self.anonymous:
            name = "anonymous"  # clients that must send some key (OpenAI's) send any
        elif name is None and given:
            return Denied(401, "the API key is not valid", "invalid_api_key")
        elif name is None:
            return Denied(
                401,
                "no API key: send 'Authorization: Bearer <key>' with a key from the"
                " router's Secret",
                "invalid_api_key",
            )
        if not self._limiter.hit(self.limit, name):
            reset = self._limiter.get_window_stats(self.limit, name).reset_time
            wait = max(1, math.ceil(reset - time.time()))
            return Denied(
                429,
                f"rate limit of {self.limit} per key reached: retry in {wait}s",
                "rate_limit_exceeded",
                wait,
            )
        return name
