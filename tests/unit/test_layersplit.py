"""Splitting a model's layers across peers: who takes part, how many layers each, and why not."""

from typing import Any

import pytest
from pydantic import ValidationError

from edgellm.api import InferenceRequestSpec
from edgellm.api.peernode import LocalModel
from edgellm.scheduling import Candidate, Decision, Unschedulable, default_profile
from edgellm.scheduling.layersplit import (
    CannotSplit,
    LayerPlan,
    layer_bytes,
    place,
    plan_layer_split,
    split_context,
)
from edgellm.worker.rpc import layer_offload
from edgellm.workerapi.protocol import SplitPlan
from tests.builders import candidate

MiB = 2**20
# 8 layers of 10 MiB each, no KV: per-layer need is exactly 10 MiB.
BIG = {"name": "big", "sizeBytes": 80 * MiB, "layers": 8, "kvBytesPerToken": 0}
REQUEST = InferenceRequestSpec.model_validate(
    {"model": "big", "prompt": "hi", "sampling": {"maxTokens": 16}}
)


def _peer(
    name: str,
    memory_mib: int,
    cpu: int = 4,
    holds: bool = False,
    lends: bool = True,
    ready: bool = True,
    region: str = "",
    cluster: str = "edge-1",
) -> Candidate:
    spec: dict[str, Any] = {"rpcServer": {"endpoint": f"{name}:50052"}} if lends else {}
    return candidate(
        name,
        ready=ready,
        cluster=cluster,
        resources={"cpu": cpu, "memory": f"{memory_mib}Mi"},
        network={"region": region},
        models=[BIG] if holds else [],
        **spec,
    )


def _layers(plan: LayerPlan | CannotSplit) -> list[tuple[str, int, int]]:
    assert isinstance(plan, LayerPlan), plan
    return [(s.candidate.name, s.first_layer, s.last_layer) for s in plan.stages]


def test_layers_are_split_by_cores_within_each_peers_memory() -> None:
    peers = [_peer("head", 30, cpu=2, holds=True), _peer("b", 60, cpu=6)]
    # by cores the head would take 2 of 8 layers; its memory holds 3, so it keeps 2
    assert _layers(plan_layer_split(REQUEST, peers, 10)) == [("head", 0, 1), ("b", 2, 7)]


def test_memory_caps_a_fast_peer_and_the_rest_flows_to_the_others() -> None:
    peers = [_peer("head", 20, cpu=16, holds=True), _peer("b", 40), _peer("c", 40)]
    plan = plan_layer_split(REQUEST, peers, 10)
    assert _layers(plan) == [("head", 0, 1), ("b", 2, 4), ("c", 5, 7)]


def test_the_fewest_largest_lenders_are_used() -> None:
    peers = [
        _peer("head", 30, holds=True),
        _peer("small", 20),
        _peer("large", 60),
    ]
    plan = plan_layer_split(REQUEST, peers, 10)
    assert [s.candidate.name for s in plan.stages] == ["head", "large"]  # type: ignore[union-attr]


def test_lenders_in_the_leaders_region_come_first_and_next_to_it() -> None:
    peers = [
        _peer("head", 30, holds=True, region="lan-a"),
        _peer("far", 90, region="lan-b"),
        _peer("near", 40, region="lan-a"),
        _peer("near2", 20, region="lan-a"),
    ]
    plan = plan_layer_split(REQUEST, peers, 10)
    assert [s.candidate.name for s in plan.stages] == ["head", "near", "near2"]  # type: ignore[union-attr]


def test_unready_excluded_and_non_lending_peers_take_no_layers() -> None:
    peers = [
        _peer("head", 40, holds=True),
        _peer("down", 80, ready=False),
        _peer("lost", 80),
        _peer("no-rpc", 80, lends=False),
        _peer("ok", 40),
    ]
    plan = plan_layer_split(REQUEST, peers, 10, excluded=frozenset({"lost"}))
    assert [s.candidate.name for s in plan.stages] == ["head", "ok"]  # type: ignore[union-attr]


def test_a_model_too_large_for_the_federation_is_refused_with_the_figures() -> None:
    peers = [_peer("head", 30, holds=True), _peer("b", 25)]
    result = plan_layer_split(REQUEST, peers, 10)
    assert isinstance(result, CannotSplit)
    assert "cannot hold 'big'" in result.message
    assert "room for 5 layers, 3 short" in result.message


def test_no_peer_holding_the_weights_means_no_split() -> None:
    result = plan_layer_split(REQUEST, [_peer("a", 500), _peer("b", 500)], 10)
    assert isinstance(result, CannotSplit)
    assert "holds the weights of 'big'" in result.message


def test_the_kv_cache_of_the_context_counts_per_layer() -> None:
    shape = LocalModel(name="m", size_bytes=80 * MiB, layers=8, kv_bytes_per_token=8 * 1024)
    assert layer_bytes(shape, 0) == 10 * MiB
    assert layer_bytes(shape, 1024) == 11 * MiB
    assert layer_bytes(LocalModel(name="m", size_bytes=1), 10) is None


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "model_context", "context"),
    [(10, 16, None, 512), (900, 200, None, 2048), (3000, 2000, 4096, 4096)],
)
def test_the_context_is_rounded_up_to_a_power_of_two_within_the_models(
    prompt: int, max_tokens: int, model_context: int | None, context: int
) -> None:
    assert split_context(prompt, max_tokens, model_context) == context


@pytest.mark.parametrize(
    ("layers", "offload"),
    [
        ([8], (0, [])),
        ([2, 3, 3], (7, [3.0, 4.0])),  # the last server also takes the output head
        ([1, 7], (8, [8.0])),
    ],
)
def test_layer_counts_become_llama_cpp_offload_settings(
    layers: list[int], offload: tuple[int, list[float]]
) -> None:
    assert layer_offload(layers) == offload


def test_a_split_plan_for_a_leader_is_checked() -> None:
    plan = {
        "context": 512,
        "leader_layers": 2,
        "stages": [{"endpoint": "10.0.0.2:50052", "layers": 6}],
    }
    assert SplitPlan.model_validate(plan).stages[0].layers == 6
    for bad in (
        {**plan, "stages": []},
        {**plan, "leader_layers": 0},
        {**plan, "stages": [{"endpoint": "http://10.0.0.2:50052", "layers": 6}]},
    ):
        with pytest.raises(ValidationError):
            SplitPlan.model_validate(bad)


def test_place_prefers_one_peer_and_splits_only_for_want_of_memory() -> None:
    profile = default_profile()
    roomy = [_peer("head", 200, holds=True), _peer("b", 60)]
    assert isinstance(place(REQUEST, roomy, profile, 10), Decision)
    tight = [_peer("head", 30, holds=True), _peer("b", 60)]
    assert isinstance(place(REQUEST, tight, profile, 10), LayerPlan)
    nobody = [_peer("a", 500), _peer("b", 500)]
    assert isinstance(place(REQUEST, nobody, profile, 10), Unschedulable)
    down = [_peer("head", 200, holds=True, ready=False), _peer("b", 60)]
    assert isinstance(place(REQUEST, down, profile, 10), Unschedulable)  # not a memory problem
    hopeless = place(REQUEST, [_peer("head", 30, holds=True), _peer("b", 25)], profile, 10)
    assert isinstance(hopeless, CannotSplit)
    assert "cannot hold 0.1 GiB of weights" in hopeless.message  # why no single peer
    assert "3 short" in hopeless.message  # and why no split
