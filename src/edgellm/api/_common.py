"""Building blocks shared by every EdgeLLM resource.

The base model (camelCase on the wire, snake_case in Python, unknown fields refused), the
identifier types that must not mix, Kubernetes quantities, object metadata and status
conditions. The resource modules build on these; `crd.py` turns them into CRD schemas.
"""

import functools
import re
from datetime import datetime
from typing import Annotated, Any, Final, Literal, NewType, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, model_validator
from pydantic.alias_generators import to_camel

GROUP: Final = "edgellm.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "edgellm.io/v1alpha1"

PeerName = NewType("PeerName", str)
ClusterName = NewType("ClusterName", str)
ModelName = NewType("ModelName", str)

# RFC 1123 label: the names Kubernetes accepts for namespaces and most objects.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# RFC 1123 subdomain: the names of most other objects (Secrets, PersistentVolumeClaims, ...).
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Kubernetes resource quantity ("8", "500m", "32Gi", "1.5e9"), without a sign: never negative.
QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _is_quantity(value: int | str) -> int | str:
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a quantity cannot be negative")
    elif not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity such as 8, 500m or 32Gi")
    return value


_SUFFIXES: dict[str, float] = {
    **{s: 1024 ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: 1000 ** (i + 1) for i, s in enumerate(("k", "M", "G", "T", "P", "E"))},
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
}


@functools.lru_cache(maxsize=4096)  # the schedulers read every peer's memory for every request
def quantity_value(quantity: int | str) -> float:
    """A quantity as a number: "32Gi" -> 34359738368.0, "500m" -> 0.5."""
    if isinstance(quantity, int):
        return float(quantity)
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(quantity)  # plain, or with an exponent: Python reads 1.5e9 too


Quantity = Annotated[
    int | str,
    AfterValidator(_is_quantity),
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
]

TrustLevel = Literal["untrusted", "community", "trusted"]
"""Ordered from least to most trusted; a request names the least it accepts."""

TRUST_ORDER: dict[TrustLevel, int] = {"untrusted": 0, "community": 1, "trusted": 2}


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, JsonValue]:
    """One `x-kubernetes-validations` entry: a CEL rule the kube-apiserver enforces."""
    validation: dict[str, JsonValue] = {"rule": rule, "message": message}
    if field_path:
        validation["fieldPath"] = field_path
    return validation


class Model(BaseModel):
    """Base of every schema: camelCase names on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as Kubernetes stores it: camelCase, unset fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ObjectMeta(BaseModel):
    """The parts of Kubernetes object metadata EdgeLLM reads; the rest is kept as it came."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    uid: str | None = None


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(Model):
    """One aspect of an object's state, as the Kubernetes API conventions define it."""

    type: str = Field(pattern=r"^[A-Z][A-Za-z0-9]*$", max_length=316)
    """Which aspect, in CamelCase: Ready, Reachable, Scheduled, ..."""
    status: ConditionStatus
    """Whether the condition holds: True, False or Unknown."""
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    """Why it last changed, in CamelCase, for programs and `kubectl get` filters."""
    message: str = Field(default="", max_length=32768)
    """Why it last changed, in words, for people."""
    last_transition_time: datetime
    """When status last changed."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation of the spec this condition was computed from."""


def conditions_field(description: str) -> Any:
    """A status `conditions` list keyed by type, as `kubectl` and server-side apply expect."""
    return Field(
        default_factory=list,
        description=description,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class LabelSelectorRequirement(Model):
    """A label key, an operator and values, as in Kubernetes label selectors."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.operator in ['In', 'NotIn'] ? size(self.values) > 0"
                    " : size(self.values) == 0",
                    "values must be non-empty for In and NotIn, and empty for Exists and"
                    " DoesNotExist",
                    ".values",
                )
            ]
        }
    )

    key: str = Field(min_length=1, max_length=317)
    """The label key the selector applies to."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the key relates to the values."""
    values: list[str] = Field(default_factory=list)
    """Values for In and NotIn; empty for Exists and DoesNotExist."""

    @model_validator(mode="after")
    def _values_match_operator(self) -> Self:
        if (self.operator in ("In", "NotIn")) != bool(self.values):
            raise ValueError(
                "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist"
            )
        return self


class LabelSelector(Model):
    """Selects peers by their labels; all requirements must hold."""

    match_labels: dict[str, str] = Field(default_factory=dict)
    """Labels a peer must carry with exactly these values."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list)
    """Further requirements on a peer's labels."""


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    observed_generation: int | None = None,
) -> tuple[list[Condition], bool]:
    """Conditions with `type_` set; whether its status or reason changed.

    As Kubernetes' meta.SetStatusCondition: lastTransitionTime moves only when status changes."""
    current = next((c for c in conditions if c.type == type_), None)
    changed = current is None or (current.status, current.reason) != (status, reason)
    transition = (
        now if current is None or current.status != status else current.last_transition_time
    )
    updated = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=observed_generation,
    )
    others = [c for c in conditions if c.type != type_]
    return sorted([*others, updated], key=lambda c: c.type), changed


def condition_status(conditions: list[Condition], type_: str) -> ConditionStatus:
    """The status of one condition, Unknown when it is absent."""
    return next((c.status for c in conditions if c.type == type_), "Unknown")
