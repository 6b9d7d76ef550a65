"""CustomResourceDefinitions generated from the pydantic models.

The models are the one source of truth; `edgellm crds` writes the YAML committed in `crds/` and
the chart, and a unit test fails when those files drift. Pydantic emits JSON Schema (with `$ref`,
`anyOf` for optionals, draft-2020 exclusive bounds); Kubernetes wants a structural OpenAPI v3
schema, so `structural()` inlines references and rewrites those constructs.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from edgellm.api._common import GROUP, VERSION
from edgellm.api.federationmember import FederationMemberSpec, FederationMemberStatus
from edgellm.api.inferencerequest import InferenceRequestSpec, InferenceRequestStatus
from edgellm.api.peernode import PeerNodeSpec, PeerNodeStatus
from edgellm.api.workerpool import WorkerPoolSpec, WorkerPoolStatus

JSONSchema = dict[str, Any]

# Keys pydantic emits that a structural schema does not allow or that only add noise.
_DROPPED_KEYS = {"title", "$defs", "const", "discriminator"}


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: Literal["string", "integer", "number", "boolean", "date"] = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class ResourceKind:
    """One custom resource: its names, scope, models and `kubectl get` columns."""

    kind: str
    plural: str
    short_names: Sequence[str]
    scope: Literal["Namespaced", "Cluster"]
    description: str
    spec: type[BaseModel]
    status: type[BaseModel]
    columns: Sequence[PrinterColumn]

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def namespaced(self) -> bool:
        return self.scope == "Namespaced"


CATEGORY = "edgellm"

PEER_NODE = ResourceKind(
    kind="PeerNode",
    plural="peernodes",
    short_names=("peer",),
    scope="Cluster",
    description="A machine of the federation that can run prefill or decode workers.",
    spec=PeerNodeSpec,
    status=PeerNodeStatus,
    columns=(
        PrinterColumn("Cluster", ".spec.cluster"),
        PrinterColumn("Ready", '.status.conditions[?(@.type=="Ready")].status'),
        PrinterColumn("Roles", ".spec.roles"),
        PrinterColumn("Accelerators", ".spec.resources.accelerators[*].model"),
        PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
    ),
)
FEDERATION_MEMBER = ResourceKind(
    kind="FederationMember",
    plural="federationmembers",
    short_names=("member",),
    scope="Cluster",
    description="Another cluster of the federation, as this cluster reaches it.",
    spec=FederationMemberSpec,
    status=FederationMemberStatus,
    columns=(
        PrinterColumn("Server", ".spec.server"),
        PrinterColumn("Reachable", '.status.conditions[?(@.type=="Reachable")].status'),
        PrinterColumn("Mirrored", ".status.mirroredPeers", "integer", "Peers mirrored there"),
        PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
    ),
)
INFERENCE_REQUEST = ResourceKind(
    kind="InferenceRequest",
    plural="inferencerequests",
    short_names=("ir",),
    scope="Namespaced",
    description="A generation asked of the federation, and its result.",
    spec=InferenceRequestSpec,
    status=InferenceRequestStatus,
    columns=(
        PrinterColumn("Phase", ".status.phase"),
        PrinterColumn("Model", ".spec.model"),
        PrinterColumn("Peer", ".status.assignment.decodePeer"),
        PrinterColumn("TTFT", ".status.timings.ttftSeconds", "number", "Seconds to first token"),
        PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
    ),
)
WORKER_POOL = ResourceKind(
    kind="WorkerPool",
    plural="workerpools",
    short_names=("wp",),
    scope="Namespaced",
    description="Warm prefill/decode workers for one model, kept on suitable cluster nodes.",
    spec=WorkerPoolSpec,
    status=WorkerPoolStatus,
    columns=(
        PrinterColumn("Model", ".spec.model"),
        PrinterColumn("Backend", ".spec.backend"),
        PrinterColumn("Demand", ".status.demand", "integer", "Unfinished requests"),
        PrinterColumn("Desired", ".status.desiredReplicas", "integer", "Workers wanted"),
        PrinterColumn("Ready", ".status.readyReplicas", "integer", "Workers ready"),
        PrinterColumn("Available", '.status.conditions[?(@.type=="Available")].status'),
        PrinterColumn("Role", ".spec.role", priority=1),
        PrinterColumn("GPUs", ".spec.resources.gpus", "integer", "GPUs per worker", 1),
        PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
    ),
)

KINDS: tuple[ResourceKind, ...] = (PEER_NODE, FEDERATION_MEMBER, INFERENCE_REQUEST, WORKER_POOL)


def structural(schema: JSONSchema, defs: dict[str, JSONSchema]) -> JSONSchema:
    """Rewrites one pydantic JSON Schema node (and its children) as a structural schema."""
    if "$ref" in schema:
        target = defs[schema["$ref"].removeprefix("#/$defs/")]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return structural(merged, defs)

    out: JSONSchema = {}
    for key, value in schema.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "anyOf":
            out.update(_any_of(value, defs))
        elif key == "properties":
            out["properties"] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = structural(value, defs)
        elif key == "description":
            out[key] = " ".join(value.split())  # docstrings wrap; kubectl explain rewraps
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # Draft 2020 puts the bound in the keyword; OpenAPI v3.0 wants a flag beside it.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif (key == "default" and value is None) or (key == "additionalProperties" and not value):
            # Optionals are omitted rather than null. Kubernetes forbids additionalProperties
            # beside properties; the apiserver prunes unknown fields of such objects instead.
            continue
        else:
            out[key] = value
    if "const" in schema:
        out["enum"] = [schema["const"]]
    if "properties" in out:
        out.setdefault("type", "object")
    return out


def _any_of(options: list[JSONSchema], defs: dict[str, JSONSchema]) -> JSONSchema:
    """`X | None` becomes X (optional fields are omitted, never null); `int | str` an
    int-or-string, as Kubernetes quantities are."""
    present = [o for o in options if o.get("type") != "null"]
    if len(present) == 1:
        return structural(present[0], defs)
    if {o.get("type") for o in present} == {"integer", "string"}:
        return {"x-kubernetes-int-or-string": True}
    raise ValueError(f"no structural form for anyOf {options}")


class _WithFactoryDefaults(GenerateJsonSchema):
    """Emits `default: {}` for sub-objects and `[]`/`{}` for collections built by a default
    factory: the apiserver applies nested defaults only inside objects that exist, so this is
    what makes a stored request show its effective sampling, placement, ... settings."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        value = factory()  # type: ignore[call-arg]
        return {} if isinstance(value, BaseModel) else value


def _model_schema(model: type[BaseModel]) -> JSONSchema:
    schema = model.model_json_schema(
        by_alias=True, mode="validation", schema_generator=_WithFactoryDefaults
    )
    return structural(schema, schema.get("$defs", {}))


def custom_resource_definition(kind: ResourceKind) -> JSONSchema:
    """The apiextensions.k8s.io/v1 CRD of one kind, as a dict ready for YAML."""
    spec_schema = _model_schema(kind.spec)
    status_schema = _model_schema(kind.status)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name},
        "spec": {
            "group": GROUP,
            "scope": kind.scope,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": list(kind.short_names),
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [_column(c) for c in kind.columns],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": kind.description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def _column(column: PrinterColumn) -> dict[str, Any]:
    out: dict[str, Any] = {"name": column.name, "type": column.type, "jsonPath": column.json_path}
    if column.description:
        out["description"] = column.description
    if column.priority:
        out["priority"] = column.priority
    return out


class _Dumper(yaml.SafeDumper):
    """Writes repeated sub-schemas out in full: anchors and aliases puzzle readers of a CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def crd_files() -> dict[str, str]:
    """File name -> YAML text of every CRD, as committed in `crds/` and the chart."""
    header = "# Generated by `edgellm crds` from src/edgellm/api; do not edit.\n"
    return {
        f"{kind.crd_name}.yaml": header
        + yaml.dump(custom_resource_definition(kind), Dumper=_Dumper, sort_keys=False, width=100)
        for kind in KINDS
    }
