"""EdgeLLM's custom resources as pydantic models: the single source of truth for every schema.

Imports nothing else of EdgeLLM; everything else imports it.
"""

from edgellm.api._common import (
    API_VERSION,
    GROUP,
    VERSION,
    ClusterName,
    Condition,
    LabelSelector,
    ModelName,
    ObjectMeta,
    PeerName,
    TrustLevel,
)
from edgellm.api.crd import KINDS, ResourceKind, crd_files, custom_resource_definition
from edgellm.api.inferencerequest import (
    ChatMessage,
    InferenceRequest,
    InferenceRequestSpec,
    InferenceRequestStatus,
    Phase,
    SamplingParams,
)
from edgellm.api.peernode import (
    Accelerator,
    PeerNode,
    PeerNodeSpec,
    PeerNodeStatus,
    PeerResources,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "VERSION",
    "Accelerator",
    "ChatMessage",
    "ClusterName",
    "Condition",
    "InferenceRequest",
    "InferenceRequestSpec",
    "InferenceRequestStatus",
    "LabelSelector",
    "ModelName",
    "ObjectMeta",
    "PeerName",
    "PeerNode",
    "PeerNodeSpec",
    "PeerNodeStatus",
    "PeerResources",
    "Phase",
    "ResourceKind",
    "SamplingParams",
    "TrustLevel",
    "crd_files",
    "custom_resource_definition",
]
