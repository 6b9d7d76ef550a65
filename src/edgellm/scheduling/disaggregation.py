"""Whether to split a request's prefill and decode over two peers.

Splitting pays only when computing the prompt's KV on the prefill peer and moving it over the
link between the two beats computing it on the decode peer itself; over home uplinks it often
does not. Pure: the operator and the router pass the figures they have, and an unknown figure
means no split.
"""

from dataclasses import dataclass

from edgellm.api import PeerNode
from edgellm.api.inferencerequest import Disaggregation


@dataclass(frozen=True)
class SplitDecision:
    split: bool
    reason: str
    """Why, with the figures, for the request's Event."""
    transfer_seconds: float | None = None
    recompute_seconds: float | None = None


def kv_transfer_seconds(kv_bytes: int, link_mbps: float) -> float:
    return kv_bytes * 8 / (link_mbps * 1_000_000)


def decide_split(
    mode: Disaggregation,
    prefill: PeerNode,
    decode: PeerNode,
    model: str,
    prompt_tokens: int,
) -> SplitDecision:
    """`prefill` is the best peer to compute the prompt other than `decode`."""
    if mode == "never":
        return SplitDecision(False, "placement.disaggregation is never")
    if "vllm" not in prefill.spec.backends or "vllm" not in decode.spec.backends:
        # llama.cpp moves no KV between peers (yet): LMCache does, for vLLM.
        return SplitDecision(False, "moving KV between peers needs the vLLM backend on both")
    if mode == "always":
        return SplitDecision(True, "placement.disaggregation is always")
    held = next((m for m in decode.spec.models if m.name == model), None)
    per_token = held.kv_bytes_per_token if held else None
    fast = prefill.status.load.prefill_tokens_per_second
    slow = decode.status.load.prefill_tokens_per_second
    if not (per_token and fast and slow):
        return SplitDecision(False, "no measured prefill speed or KV size to compare")
    link = min(prefill.spec.network.uplink_mbps, decode.spec.network.downlink_mbps)
    transfer = kv_transfer_seconds(per_token * prompt_tokens, link)
    remote = prompt_tokens / fast + transfer
    local = prompt_tokens / slow
    figures = f"prefill elsewhere and move {transfer:.2f}s, {remote:.2f}s in all; here {local:.2f}s"
    return SplitDecision(remote < local, figures, transfer, local)
