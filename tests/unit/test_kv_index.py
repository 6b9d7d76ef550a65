"""The KV index: which worker holds which blocks, from their events."""

from collections.abc import Sequence

from edgellm.kvcache import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    block_hashes,
    external_hash,
)
from edgellm.kvcache.index import KVIndex

SEED = "0"
PROMPT = [external_hash(h) for h in block_hashes(list(range(64)), seed=SEED)]  # 4 blocks


def _stored(hashes: Sequence[int], medium: str = MEDIUM_CPU) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=None,
        token_ids=[0] * 16 * len(hashes),
        block_size=16,
        lora_id=None,
        medium=medium,
        lora_name=None,
    )


def test_a_prompt_matches_the_leading_blocks_a_worker_holds() -> None:
    index = KVIndex()
    index.apply("a", [_stored(PROMPT[:3])])
    index.apply("b", [_stored(PROMPT[:1])])
    assert index.matched_blocks("a", PROMPT) == 3
    assert index.matched_blocks("b", PROMPT) == 1
    assert index.matched_blocks("c", PROMPT) == 0
    assert len(index) == 4


def test_a_removed_block_ends_the_match_there() -> None:
    index = KVIndex()
    index.apply("a", [_stored(PROMPT), BlockRemoved(block_hashes=[PROMPT[1]], medium=MEDIUM_CPU)])
    assert index.matched_blocks("a", PROMPT) == 1


def test_cleared_and_forgotten_workers_hold_nothing() -> None:
    index = KVIndex()
    index.apply("a", [_stored(PROMPT)])
    index.apply("b", [_stored(PROMPT)])
    index.apply("a", [AllBlocksCleared()])
    index.forget("b")
    assert index.matched_blocks("a", PROMPT) == 0
    assert index.matched_blocks("b", PROMPT) == 0
    assert len(index) == 0


def test_a_block_evicted_from_one_medium_still_matches_where_another_holds_it() -> None:
    index = KVIndex()
    index.apply("a", [_stored(PROMPT[:2]), _stored(PROMPT[:2], MEDIUM_GPU)])
    index.apply("a", [BlockRemoved(block_hashes=PROMPT[:2], medium=MEDIUM_GPU)])
    assert index.matched_blocks("a", PROMPT) == 2
    assert index.blocks_by_medium() == {MEDIUM_CPU: 2, MEDIUM_GPU: 0}
    index.apply("a", [BlockRemoved(block_hashes=PROMPT[:1], medium=MEDIUM_CPU)])
    assert index.matched_blocks("a", PROMPT) == 0
