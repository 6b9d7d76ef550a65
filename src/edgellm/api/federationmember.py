"""`FederationMember`: another cluster of the federation, as this cluster reaches it.

Cluster-scoped. `edgellm federation join` and the operators (when they introduce members to each
other) write the spec; this cluster's operator writes the status while it mirrors its peers there.
"""

from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field

from edgellm.api._common import (
    API_VERSION,
    DNS_LABEL_PATTERN,
    Condition,
    Model,
    ObjectMeta,
    conditions_field,
)


class FederationMemberSpec(Model):
    """How to reach the member cluster."""

    server: str = Field(pattern=r"^https://[^\s/]+(/\S*)?$", max_length=2048)
    """URL of the member's kube-apiserver."""
    ca_bundle: str = Field(min_length=1, max_length=65536)
    """Base64 PEM of the certificate authority the member's apiserver presents."""
    credentials_secret: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63)
    """Secret in the edgellm-federation namespace whose `token` key reaches the member."""


class FederationMemberStatus(Model):
    """What this cluster's operator last saw of the member."""

    conditions: list[Condition] = conditions_field(
        "Reachable (its apiserver answered the last probe), Synced (this cluster's peers are"
        " mirrored there)."
    )
    last_probe_time: datetime | None = None
    """When the operator last tried to reach the member."""
    mirrored_peers: int = Field(default=0, ge=0)
    """How many of this cluster's peers are mirrored in the member."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the status was computed from."""


class FederationMember(Model):
    """Another cluster of the federation, as this cluster reaches it."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["edgellm.io/v1alpha1"] = API_VERSION
    kind: Literal["FederationMember"] = "FederationMember"
    metadata: ObjectMeta
    spec: FederationMemberSpec
    status: FederationMemberStatus = Field(default_factory=FederationMemberStatus)
