"""Which worker holds which KV blocks, and where (GPU, CPU, IPFS), from the workers' KV events.

The operator and the router feed it every batch a worker publishes and ask, for a prompt's
chained block hashes, how many leading blocks each worker holds: a block's hash names its whole
prefix, so the first miss ends the match. A block counts in whichever medium holds it (vLLM
offloads from GPU to CPU; a peer may keep blocks in IPFS). Pure and single-threaded: the caller
owns the events.
"""

from collections.abc import Collection, Container, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from edgellm.kvcache.events import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    MEDIUM_IPFS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
)
from edgellm.kvcache.hashing import ExternalBlockHash, external_hash

K = TypeVar("K")

# A prefix in IPFS counts for this much of one in a worker's memory: loading it costs a fetch
# and a restore (0.15x of recomputing 2k tokens of the bench model, benchmarks.kv_ipfs).
IPFS_HIT_VALUE = 0.8
IN_MEMORY = (MEDIUM_GPU, MEDIUM_CPU)


def leading_matches(prompt: Sequence[K], held: Container[K]) -> int:
    """How many of the prompt's leading keys `held` has; the first miss ends the match."""
    count = 0
    for key in prompt:
        if key not in held:
            break
        count += 1
    return count


def common_prefix(a: Sequence[K], b: Sequence[K]) -> int:
    """How many leading items two sequences (tokens, block hashes) share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


class KVIndex:
    def __init__(self) -> None:
        # worker -> medium -> blocks: a removal names its medium, and one medium's eviction
        # leaves the block usable where another still holds it.
        self._blocks: dict[str, dict[str, set[ExternalBlockHash]]] = {}

    def apply(self, worker: str, events: Iterable[KVEvent]) -> None:
        mediums = self._blocks.setdefault(worker, {})
        for event in events:
            if isinstance(event, BlockStored):
                held = mediums.setdefault(event.medium or MEDIUM_GPU, set())
                held.update(external_hash(h) for h in event.block_hashes)
            elif isinstance(event, BlockRemoved):
                held = mediums.get(event.medium or MEDIUM_GPU, set())
                held.difference_update(external_hash(h) for h in event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                mediums.clear()

    def forget(self, worker: str) -> None:
        """A worker gone: none of its blocks can be reused."""
        self._blocks.pop(worker, None)

    def matched_blocks(
        self,
        worker: str,
        prompt: Sequence[ExternalBlockHash],
        mediums: Collection[str] | None = None,
    ) -> int:
        """How many of the prompt's leading blocks the worker holds, in any of `mediums`
        (default: any medium)."""
        held = [
            blocks
            for medium, blocks in self._blocks.get(worker, {}).items()
            if mediums is None or medium in mediums
        ]
        count = 0
        for block in prompt:
            if not any(block in blocks for blocks in held):
                break
            count += 1
        return count

    def best_holder(
        self,
        prompt: Sequence[ExternalBlockHash],
        medium: str,
        among: Collection[str] | None = None,
    ) -> tuple[str, int] | None:
        """The worker (of `among`, default any) holding most of the prompt's leading blocks in
        `medium`, and how many; None when none holds the first."""
        best = None
        for worker, mediums in self._blocks.items():
            held = mediums.get(medium)
            if not held or (among is not None and worker not in among):
                continue
            if (count := leading_matches(prompt, held)) and count > (best or ("", 0))[1]:
                best = (worker, count)
        return best

    def lookup(
        self, prompt: Sequence[ExternalBlockHash], model_holders: Collection[str]
    ) -> "PromptLookup":
        """What the index knows of one prompt: asked once per request, then per peer. Block
        hashes do not name the model, so only KV from peers of the prompt's model counts."""
        in_ipfs = self.best_holder(prompt, MEDIUM_IPFS, model_holders) if prompt else None
        return PromptLookup(self, prompt, in_ipfs)

    def blocks_by_medium(self, worker: str | None = None) -> dict[str, int]:
        """How many blocks the index knows, per medium, of `worker` or summed over workers."""
        totals: dict[str, int] = {}
        workers = self._blocks.values() if worker is None else [self._blocks.get(worker, {})]
        for mediums in workers:
            for medium, blocks in mediums.items():
                totals[medium] = totals.get(medium, 0) + len(blocks)
        return totals

    def __len__(self) -> int:
        return sum(self.blocks_by_medium().values())


@dataclass(frozen=True)
class PromptLookup:
    index: KVIndex
    prompt: Sequence[ExternalBlockHash]
    in_ipfs: tuple[str, int] | None
    """The peer that announced the longest prefix of the prompt in IPFS, and its blocks."""

    def in_memory(self, worker: str) -> int:
        return self.index.matched_blocks(worker, self.prompt, IN_MEMORY)

    def reusable(self, held: int) -> float:
        """The share of the prompt a peer need not compute, holding `held` leading blocks in
        memory: those, or a prefix any peer can load from IPFS, at a discount for the fetch."""
        if not self.prompt:
            return 0.0
        from_ipfs = IPFS_HIT_VALUE * self.in_ipfs[1] if self.in_ipfs else 0.0
        return max(held, from_ipfs) / len(self.prompt)
