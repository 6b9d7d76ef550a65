"""The router's routing policies: EdgeLLM's precise KV-aware policy, and three baselines to
compare it with, each a profile of the shared scheduling plugins.

| policy | prompt overlap from | scorers | picker |
|---|---|---|---|
| `kv-aware` | the workers' KV events (what they hold now) | the default profile's | max-score |
| `approx-prefix` | the router's own routing history | the default profile's | max-score |
| `least-load` | (none) | least-loaded | max-score |
| `round-robin` | (none) | (none) | round-robin |

The approximate policy is what routers without KV events do (vLLM production-stack's
prefix-aware routing): it remembers which worker it sent each text prefix to, and guesses the
worker still holds it. It needs no tokenizer, and it is wrong whenever a worker evicted the
prefix or another router sent work there.
"""

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal, get_args

from edgellm.kvcache.index import leading_matches
from edgellm.scheduling import Profile, default_profile
from edgellm.scheduling.framework import WeightedScorer
from edgellm.scheduling.plugins import LeastLoaded, MaxScore, RoundRobin

Policy = Literal["kv-aware", "approx-prefix", "least-load", "round-robin"]
POLICIES: tuple[Policy, ...] = get_args(Policy)


def policy_profile(policy: Policy, base: Profile | None = None) -> Profile:
    """The profile a policy schedules with; `base` (default: the default profile) gives the
    filters, and the scorers of the two prefix policies."""
    base = base or default_profile()
    if policy == "least-load":
        return Profile(base.filters, [WeightedScorer(LeastLoaded(), 1.0)], MaxScore())
    if policy == "round-robin":
        return Profile(base.filters, [], RoundRobin())
    return base


TEXT_CHUNK = 128  # characters: about 32 tokens, two KV blocks


def text_chunk_keys(text: str) -> list[int]:
    """Chained hashes of the text's full chunks: a chunk's key names its whole prefix."""
    keys, previous = [], b""
    for start in range(0, len(text) - TEXT_CHUNK + 1, TEXT_CHUNK):
        chunk = text[start : start + TEXT_CHUNK].encode()
        previous = hashlib.blake2b(previous + chunk, digest_size=8).digest()
        keys.append(int.from_bytes(previous))
    return keys


class RoutingHistory:
    """Which text prefixes the router sent to which worker, the most recent `capacity` per
    worker (the least recently routed are forgotten first)."""

    def __init__(self, capacity: int = 8192) -> None:
        self.capacity = capacity
        self._routed: dict[str, OrderedDict[int, None]] = {}

    def record(self, worker: str, keys: Sequence[int]) -> None:
        routed = self._routed.setdefault(worker, OrderedDict())
        for key in keys:
            routed[key] = None
            routed.move_to_end(key)
        while len(routed) > self.capacity:
            routed.popitem(last=False)

    def matched(self, worker: str, keys: Sequence[int]) -> int:
        return leading_matches(keys, self._routed.get(worker, ()))

    def forget(self, worker: str) -> None:
        self._routed.pop(worker, None)
