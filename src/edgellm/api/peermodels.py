"""Peers as validated `PeerNode` models, each validated once per version.

The operator's health loop looks at every peer every few seconds, and the operator's and the
router's schedulers at every peer for every request; with 1,000 peers, validating each body each
time was most of the operator's CPU.
"""

from typing import Any

from pydantic import ValidationError

from edgellm.api.peernode import PeerNode


class PeerModels:
    def __init__(self) -> None:
        self._models: dict[str, tuple[str, PeerNode | ValidationError]] = {}

    def get(self, body: dict[str, Any]) -> PeerNode | ValidationError:
        """The body as a model, or why it is not one; cached until its resourceVersion moves."""
        name = body["metadata"]["name"]
        version = body["metadata"].get("resourceVersion", "")
        cached = self._models.get(name)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            peer: PeerNode | ValidationError = PeerNode.model_validate(body)
        except ValidationError as e:
            peer = e
        self._models[name] = (version, peer)
        return peer

    def forget(self, name: str) -> None:
        self._models.pop(name, None)
