"""EdgeLLM's custom resources as pydantic models: the single source of truth for every schema.

Imports nothing else of EdgeLLM; everything else imports it.
"""

from edgellm.api._common import (
    API_VERSION,
    GROUP,
    TRUST_ORDER,
    VERSION,
    ClusterName,
    Condition,
    ConditionStatus,
    LabelSelector,
    ModelName,
    ObjectMeta,
    PeerName,
    TrustLevel,
    condition_status,
    quantity_value,
    set_condition,
)
from edgellm.api.crd import KINDS, ResourceKind, crd_files, custom_resource_definition
from edgellm.api.federationmember import (
    FederationMember,
    FederationMemberSpec,
    FederationMemberStatus,
)
from edgellm.api.inferencerequest import (
    ChatMessage,
    InferenceRequest,
    InferenceRequestSpec,
    InferenceRequestStatus,
    Phase,
    SamplingParams,
)
from edgellm.api.peermodels import PeerModels
from edgellm.api.peernode import (
    ORIGIN_CLUSTER_LABEL,
    Accelerator,
    PeerLoad,
    PeerNode,
    PeerNodeSpec,
    PeerNodeStatus,
    PeerResources,
)
from edgellm.api.workerpool import (
    ModelSource,
    Toleration,
    WorkerPool,
    WorkerPoolSpec,
    WorkerPoolStatus,
    WorkerResources,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "ORIGIN_CLUSTER_LABEL",
    "TRUST_ORDER",
    "VERSION",
    "Accelerator",
    "ChatMessage",
    "ClusterName",
    "Condition",
    "ConditionStatus",
    "FederationMember",
    "FederationMemberSpec",
    "FederationMemberStatus",
    "InferenceRequest",
    "InferenceRequestSpec",
    "InferenceRequestStatus",
    "LabelSelector",
    "ModelName",
    "ModelSource",
    "ObjectMeta",
    "PeerLoad",
    "PeerModels",
    "PeerName",
    "PeerNode",
    "PeerNodeSpec",
    "PeerNodeStatus",
    "PeerResources",
    "Phase",
    "ResourceKind",
    "SamplingParams",
    "Toleration",
    "TrustLevel",
    "WorkerPool",
    "WorkerPoolSpec",
    "WorkerPoolStatus",
    "WorkerResources",
    "condition_status",
    "crd_files",
    "custom_resource_definition",
    "quantity_value",
    "set_condition",
]
