"""Which worker holds which KV blocks, from the workers' KV events.

The operator (and the router) feed it every batch a worker publishes and ask, for a prompt's
chained block hashes, how many leading blocks each worker holds: a block's hash names its whole
prefix, so the first miss ends the match. Pure and single-threaded: the caller owns the events.
"""

from collections.abc import Iterable, Sequence

from edgellm.kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from edgellm.kvcache.hashing import ExternalBlockHash, external_hash


class KVIndex:
    def __init__(self) -> None:
        self._blocks: dict[str, set[ExternalBlockHash]] = {}

    def apply(self, worker: str, events: Iterable[KVEvent]) -> None:
        held = self._blocks.setdefault(worker, set())
        for event in events:
            if isinstance(event, BlockStored):
                held.update(external_hash(h) for h in event.block_hashes)
            elif isinstance(event, BlockRemoved):
                held.difference_update(external_hash(h) for h in event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                held.clear()

    def forget(self, worker: str) -> None:
        """A worker gone: none of its blocks can be reused."""
        self._blocks.pop(worker, None)

    def matched_blocks(self, worker: str, prompt: Sequence[ExternalBlockHash]) -> int:
        """How many of the prompt's leading blocks the worker holds."""
        held = self._blocks.get(worker, set())
        count = 0
        for block in prompt:
            if block not in held:
                break
            count += 1
        return count

    def __len__(self) -> int:
        return sum(len(blocks) for blocks in self._blocks.values())
