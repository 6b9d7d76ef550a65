"""Whether to split a request's prefill and decode over two peers.

Splitting pays only when computing the prompt's KV on the prefill peer and moving it over the
link between the two beats computing it on the decode peer itself; over home uplinks it often
does not. Both peers must move KV the same way: vLLM peers with LMCache, llama.cpp peers by
handing over the context's state (the decode worker's `kvFrom`). Pure: the operator and the
router pass the figures they have, and an unknown figure means no split.
"""

from dataclasses import dataclass
from typing import Final

from edgellm.api import PeerNode
from edgellm.api.inferencerequest import Disaggregation
from edgellm.api.peernode import Backend


@dataclass(frozen=True)
class SplitDecision:
    split: bool
    reason: str
    """Why, with the figures, for the request's Event."""
    transfer_seconds: float | None = None
    recompute_seconds: float | None = None
    backend: Backend | None = None
    """The backend that moves the KV when split, which says how: LMCache, or `kvFrom`."""


KV_MOVERS: Final[tuple[Backend, ...]] = ("vllm", "llamacpp")
"""The backends that move a prompt's KV between two peers of their own kind, the first
preferred: vLLM's LMCache moves blocks as they are computed; llama.cpp's state moves whole."""


def kv_mover(prefill: PeerNode, decode: PeerNode) -> Backend | None:
    """The backend that can move KV from `prefill` to `decode`: one both run, or None."""
    return next(
        (b for b in KV_MOVERS if b in prefill.spec.backends and b in decode.spec.backends), None
    )


SPLIT_OVERHEAD_SECONDS: Final = 0.05
"""What a split costs whatever the prompt: a second worker's round trip, saving and loading the
state. Without it, two like peers would split short prompts on noise in their measured speeds."""


def kv_transfer_seconds(kv_bytes: int, link_mbps: float) -> float:
    return kv_bytes * 8 / (link_mbps * 1_000_000)


def decide_split(
    mode: Disaggregation,
    prefill: PeerNode,
    decode: PeerNode,
    model: str,
    prompt_tokens: int,
) -> SplitDecision:
    """`prefill` is the best peer to compute the prompt other than `decode`; both must run a
    backend that moves KV (`kv_mover`), as a vLLM peer and a llama.cpp one cannot trade it."""
    if mode == "never":
        return SplitDecision(False, "placement.disaggregation is never")
    backend = kv_mover(prefill, decode)
    if backend is None:
        return SplitDecision(
            False, "moving KV between peers needs the same backend on both: vllm or llamacpp"
        )
    if mode == "always":
        return SplitDecision(True, "placement.disaggregation is always", backend=backend)
    held = next((m for m in decode.spec.models if m.name == model), None)
    per_token = held.kv_bytes_per_token if held else None
    fast = prefill.status.load.prefill_tokens_per_second
    slow = decode.status.load.prefill_tokens_per_second
    if not (per_token and fast and slow):
        return SplitDecision(False, "no measured prefill speed or KV size to compare")
    link = min(prefill.spec.network.uplink_mbps, decode.spec.network.downlink_mbps)
    transfer = kv_transfer_seconds(per_token * prompt_tokens, link)
    remote = prompt_tokens / fast + transfer + SPLIT_OVERHEAD_SECONDS
    local = prompt_tokens / slow
    figures = f"prefill elsewhere and move {transfer:.2f}s, {remote:.2f}s in all; here {local:.2f}s"
    return SplitDecision(remote < local, figures, transfer, local, backend)
