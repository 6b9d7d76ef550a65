"""EdgeLLM's resources against a real kube-apiserver: installed, accepted, shown, refused."""

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from edgellm.api import GROUP, VERSION
from edgellm.dev.federation import LocalFederation
from edgellm.kube import api_client
from tests.e2e.helpers import kubectl, manifest

PEER: dict[str, Any] = {
    "cluster": "edge-1",
    "endpoint": "http://127.0.0.1:8600",
    "roles": ["prefill", "decode"],
    "backends": ["llamacpp", "vllm"],
    "resources": {
        "cpu": 16,
        "memory": "64Gi",
        "accelerators": [
            {"vendor": "nvidia", "model": "NVIDIA-GeForce-RTX-4090", "memory": "24Gi"}
        ],
    },
}
REQUEST: dict[str, Any] = {
    "model": "tiny-random",
    "messages": [{"role": "user", "content": "Say hello."}],
    "sampling": {"maxTokens": 16, "temperature": 0},
}


def _create(api: client.ApiClient, kind: str, spec: dict[str, Any], name: str) -> dict[str, Any]:
    objects = client.CustomObjectsApi(api)
    body = manifest(kind, spec, name)
    created: dict[str, Any]
    if kind == "PeerNode":
        created = objects.create_cluster_custom_object(
            GROUP, VERSION, "peernodes", body, field_validation="Strict"
        )
    else:
        created = objects.create_namespaced_custom_object(
            GROUP, VERSION, "default", "inferencerequests", body, field_validation="Strict"
        )
    return created


def _rejection(api: client.ApiClient, kind: str, spec: dict[str, Any], name: str) -> str:
    with pytest.raises(client.ApiException) as caught:
        _create(api, kind, spec, name)
    assert caught.value.status in (400, 422)
    return str(json.loads(caught.value.body)["message"])


def test_the_crds_are_established_in_every_cluster(federation: LocalFederation) -> None:
    for cluster in federation.clusters:
        with api_client(cluster.kubeconfig("admin")) as api:
            extensions = client.ApiextensionsV1Api(api)
            for name in ("peernodes.edgellm.io", "inferencerequests.edgellm.io"):
                conditions = extensions.read_custom_resource_definition(name).status.conditions
                assert any(c.type == "Established" and c.status == "True" for c in conditions)


def test_valid_objects_are_accepted_with_defaults_and_shown_with_printer_columns(
    api: client.ApiClient, kubeconfig_file: Path
) -> None:
    peer = _create(api, "PeerNode", PEER, "gpu-box")
    request = _create(api, "InferenceRequest", REQUEST, "greeting")
    assert peer["spec"]["heartbeatTTLSeconds"] == 30
    assert peer["spec"]["trustLevel"] == "community"
    assert request["spec"]["sampling"]["topP"] == 1.0
    assert request["spec"]["placement"]["disaggregation"] == "auto"

    shown = kubectl(kubeconfig_file, "get", "peer,ir", "--namespace=default")
    assert shown.returncode == 0, shown.stderr
    headers = [line.split() for line in shown.stdout.splitlines() if line.startswith("NAME")]
    assert headers == [
        ["NAME", "CLUSTER", "READY", "ROLES", "ACCELERATORS", "AGE"],
        ["NAME", "PHASE", "MODEL", "PEER", "TTFT", "AGE"],
    ]
    assert "NVIDIA-GeForce-RTX-4090" in shown.stdout
    assert "tiny-random" in shown.stdout

    explained = kubectl(
        kubeconfig_file, "explain", "inferencerequest.spec.placement.disaggregation"
    )
    assert explained.returncode == 0, explained.stderr
    assert "moving the KV cache is faster" in " ".join(explained.stdout.split())


MALFORMED: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "wrong-type",
        "InferenceRequest",
        {**REQUEST, "sampling": {"maxTokens": "many"}},
        "spec.sampling.maxTokens",
    ),
    ("missing-model", "InferenceRequest", {"prompt": "hi"}, "spec.model: Required value"),
    (
        "temperature-too-high",
        "InferenceRequest",
        {**REQUEST, "sampling": {"temperature": 3}},
        "spec.sampling.temperature",
    ),
    (
        "max-tokens-zero",
        "InferenceRequest",
        {**REQUEST, "sampling": {"maxTokens": 0}},
        "spec.sampling.maxTokens",
    ),
    (
        "two-prompts",
        "InferenceRequest",
        {**REQUEST, "prompt": "hi"},
        "exactly one of prompt, messages or promptFrom",
    ),
    (
        "no-prompt",
        "InferenceRequest",
        {"model": "m"},
        "exactly one of prompt, messages or promptFrom",
    ),
    (
        "two-prompt-sources",
        "InferenceRequest",
        {
            "model": "m",
            "promptFrom": {
                "secretKeyRef": {"name": "a", "key": "b"},
                "configMapKeyRef": {"name": "a", "key": "b"},
            },
        },
        "spec.promptFrom: Invalid value: exactly one of secretKeyRef or configMapKeyRef",
    ),
    (
        "selector-without-values",
        "InferenceRequest",
        {
            **REQUEST,
            "placement": {"peerSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]}},
        },
        "spec.placement.peerSelector.matchExpressions[0].values",
    ),
    (
        "unknown-disaggregation",
        "InferenceRequest",
        {**REQUEST, "placement": {"disaggregation": "sometimes"}},
        'spec.placement.disaggregation: Unsupported value: "sometimes"',
    ),
    (
        "unknown-role",
        "InferenceRequest",
        {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
        "spec.messages[0].role",
    ),
    (
        "unknown-field",
        "InferenceRequest",
        {**REQUEST, "promt": "typo"},
        'unknown field "spec.promt"',
    ),
    (
        "vllm-without-gpu",
        "PeerNode",
        {**PEER, "resources": {"cpu": 4, "memory": "8Gi"}},
        "spec.backends: Invalid value: the vllm backend needs",
    ),
    (
        "duplicate-role",
        "PeerNode",
        {**PEER, "roles": ["decode", "decode"]},
        'spec.roles[1]: Duplicate value: "decode"',
    ),
    (
        "bad-quantity",
        "PeerNode",
        {**PEER, "resources": {**PEER["resources"], "memory": "lots"}},
        "spec.resources.memory",
    ),
    ("bad-endpoint", "PeerNode", {**PEER, "endpoint": "ftp://peer"}, "spec.endpoint"),
    (
        "missing-resources",
        "PeerNode",
        {k: v for k, v in PEER.items() if k != "resources"},
        "spec.resources: Required value",
    ),
    (
        "negative-bandwidth",
        "PeerNode",
        {**PEER, "network": {"uplinkMbps": -5}},
        "spec.network.uplinkMbps",
    ),
]


@pytest.mark.parametrize(
    ("case", "kind", "spec", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_a_malformed_object_is_refused_naming_the_field(
    api: client.ApiClient, case: str, kind: str, spec: dict[str, Any], expected: str
) -> None:
    assert expected in _rejection(api, kind, spec, f"bad-{case}")


def test_the_owning_cluster_of_a_peer_cannot_change(api: client.ApiClient) -> None:
    _create(api, "PeerNode", PEER, "moving-peer")
    with pytest.raises(client.ApiException) as caught:
        client.CustomObjectsApi(api).patch_cluster_custom_object(
            GROUP, VERSION, "peernodes", "moving-peer", {"spec": {"cluster": "edge-2"}}
        )
    assert "spec.cluster: Invalid value" in caught.value.body
    assert "cluster is immutable" in caught.value.body


def test_a_request_spec_cannot_change_after_creation(api: client.ApiClient) -> None:
    _create(api, "InferenceRequest", REQUEST, "fixed")
    with pytest.raises(client.ApiException) as caught:
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            GROUP, VERSION, "default", "inferencerequests", "fixed", {"spec": {"model": "other"}}
        )
    assert "spec is immutable" in caught.value.body


def test_a_status_update_does_not_change_the_generation(api: client.ApiClient) -> None:
    objects = client.CustomObjectsApi(api)
    created = _create(api, "InferenceRequest", REQUEST, "status-only")
    generation = created["metadata"]["generation"]
    updated = objects.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        "default",
        "inferencerequests",
        "status-only",
        {
            "status": {"phase": "Running", "observedGeneration": generation},
            "spec": {"model": "sneaky"},
        },
    )
    assert updated["status"]["phase"] == "Running"
    assert updated["metadata"]["generation"] == generation
    assert updated["spec"]["model"] == REQUEST["model"], "the status subresource must ignore spec"


def test_the_shipped_examples_are_accepted(kubeconfig_file: Path) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    applied = kubectl(kubeconfig_file, "apply", "--dry-run=server", "-f", str(examples))
    assert applied.returncode == 0, applied.stderr
    assert "inferencerequest.edgellm.io/hello created (server dry run)" in applied.stdout
