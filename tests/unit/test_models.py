"""The models validate what the CRDs' CEL rules validate, so Python callers get the same errors."""

from typing import Any

import pytest
from pydantic import ValidationError

import edgellm.api
from edgellm.api import InferenceRequestSpec, PeerNode, PeerNodeSpec

PEER_SPEC: dict[str, Any] = {
    "cluster": "edge-1",
    "endpoint": "http://127.0.0.1:8600",
    "roles": ["prefill", "decode"],
    "backends": ["llamacpp"],
    "resources": {"cpu": 8, "memory": "32Gi"},
}


def test_a_peer_round_trips_in_camel_case_with_defaults() -> None:
    peer = PeerNode.model_validate({"metadata": {"name": "p1"}, "spec": PEER_SPEC})
    wire = peer.to_wire()
    assert wire["apiVersion"] == "edgellm.io/v1alpha1"
    assert wire["spec"]["heartbeatTTLSeconds"] == 30
    assert wire["spec"]["network"]["uplinkMbps"] == 100.0
    assert PeerNode.model_validate(wire) == peer


def test_a_vllm_peer_without_a_gpu_is_refused() -> None:
    with pytest.raises(ValidationError, match="vllm backend needs an nvidia or amd accelerator"):
        PeerNodeSpec.model_validate({**PEER_SPEC, "backends": ["vllm"]})
    gpu = {"vendor": "nvidia", "model": "RTX-4090", "memory": "24Gi"}
    spec = PeerNodeSpec.model_validate(
        {
            **PEER_SPEC,
            "backends": ["vllm"],
            "resources": {**PEER_SPEC["resources"], "accelerators": [gpu]},
        }
    )
    assert spec.resources.accelerators[0].count == 1


@pytest.mark.parametrize("quantity", ["lots", "-1", "1.5.3", -4])
def test_a_malformed_quantity_is_refused(quantity: Any) -> None:
    with pytest.raises(ValidationError, match="quantity"):
        PeerNodeSpec.model_validate({**PEER_SPEC, "resources": {"cpu": quantity, "memory": "1Gi"}})


@pytest.mark.parametrize(
    "prompts",
    [{}, {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}],
    ids=["none", "two"],
)
def test_a_request_needs_exactly_one_prompt(prompts: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="exactly one of prompt, messages or promptFrom"):
        InferenceRequestSpec.model_validate({"model": "tiny", **prompts})


def test_a_prompt_source_names_exactly_one_object() -> None:
    ref = {"name": "secret-prompt", "key": "text"}
    with pytest.raises(ValidationError, match="exactly one of secretKeyRef or configMapKeyRef"):
        InferenceRequestSpec.model_validate(
            {"model": "tiny", "promptFrom": {"secretKeyRef": ref, "configMapKeyRef": ref}}
        )


@pytest.mark.parametrize(
    "requirement",
    [
        {"key": "gpu", "operator": "In", "values": []},
        {"key": "gpu", "operator": "Exists", "values": ["x"]},
    ],
)
def test_selector_values_must_fit_the_operator(requirement: dict[str, Any]) -> None:
    placement = {"peerSelector": {"matchExpressions": [requirement]}}
    with pytest.raises(ValidationError, match="values must be non-empty for In and NotIn"):
        InferenceRequestSpec.model_validate({"model": "m", "prompt": "p", "placement": placement})


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="promt"):
        InferenceRequestSpec.model_validate({"model": "m", "promt": "typo"})


def test_the_public_api_is_exactly_what_is_intended() -> None:
    public = {name for name in dir(edgellm.api) if not name.startswith("_")}
    modules = {
        "crd",
        "federationmember",
        "inferencerequest",
        "peermodels",
        "peernode",
        "workerpool",
    }
    assert public - modules == set(edgellm.api.__all__)
