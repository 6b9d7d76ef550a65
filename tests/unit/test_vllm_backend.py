"""The vLLM backend without a GPU: the command line, LMCache's YAML and environment it
generates, and how vLLM's streamed completions become pieces.

The streamed chunks below are written as vLLM 0.33.0's `completion_stream_generator` writes
them (vllm/entrypoints/openai/completion/serving.py): text chunks dumped with
`exclude_unset=True`, the final usage chunk with `exclude_none=True`, then `[DONE]`.
"""

import ast
import asyncio
import importlib.util
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from edgellm.worker.backend import GenerationJob, Run, Sampling, Usage, completion_request
from edgellm.worker.vllm import (
    IPFS_PLUGIN_CLASS,
    IPFS_PLUGIN_MODULE,
    HeadlessRankError,
    Lmcache,
    MultiNode,
    NoChatTemplateError,
    RemoteStoragePlugin,
    Role,
    StagePeer,
    VllmBackend,
    VllmSettings,
    VllmStartError,
    base_url,
    command,
    environment,
    lmcache_config,
    pipeline_ranks,
)


def settings(**overrides: Any) -> VllmSettings:
    return VllmSettings.model_validate(
        {"model": "/models/llama-8b", "servedModelName": "llama-8b", **overrides}
    )


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} appears {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def json_flag(argv: list[str], name: str) -> dict[str, Any]:
    value = json.loads(flag(argv, name))
    assert isinstance(value, dict)
    return value


# The command line


def test_the_command_serves_the_model_with_portable_prefix_caching() -> None:
    argv = command(settings(host="0.0.0.0", port=8100, maxModelLen=8192))
    assert argv[:3] == ["vllm", "serve", "/models/llama-8b"]
    assert flag(argv, "--host") == "0.0.0.0"
    assert flag(argv, "--port") == "8100"
    assert flag(argv, "--served-model-name") == "llama-8b"
    assert flag(argv, "--max-model-len") == "8192"
    assert flag(argv, "--gpu-memory-utilization") == "0.9"
    assert "--enable-prefix-caching" in argv
    assert flag(argv, "--prefix-caching-hash-algo") == "sha256_cbor"
    assert flag(argv, "--block-size") == "16"
    assert "--enable-prompt-tokens-details" in argv


def test_the_model_length_is_left_to_the_model_when_unset() -> None:
    assert "--max-model-len" not in command(settings())


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (4, 2), (1, 3)])
def test_the_command_splits_the_model_over_gpus_as_asked(tp: int, pp: int) -> None:
    argv = command(settings(tensorParallelSize=tp, pipelineParallelSize=pp))
    assert flag(argv, "--tensor-parallel-size") == str(tp)
    assert flag(argv, "--pipeline-parallel-size") == str(pp)


def test_extra_args_come_after_edgellms_flags() -> None:
    argv = command(settings(extraArgs=["--enforce-eager", "--dtype", "half"]))
    assert argv[-3:] == ["--enforce-eager", "--dtype", "half"]


def test_kv_events_are_published_over_zmq_on_the_given_endpoint_and_topic() -> None:
    argv = command(settings(kvEvents={"endpoint": "tcp://*:6001"}))
    assert json_flag(argv, "--kv-events-config") == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:6001",
        "topic": "",
    }


def test_a_replay_endpoint_is_passed_only_when_set() -> None:
    argv = command(settings(kvEvents={"replayEndpoint": "tcp://*:5558"}))
    assert json_flag(argv, "--kv-events-config")["replay_endpoint"] == "tcp://*:5558"


def test_disabled_kv_events_leave_the_flag_out() -> None:
    assert "--kv-events-config" not in command(settings(kvEvents={"enabled": False}))


@pytest.mark.parametrize(
    ("role", "kv_role", "extra"),
    [
        ("both", "kv_both", None),
        ("prefill", "kv_producer", {"discard_partial_chunks": False}),
        ("decode", "kv_consumer", {"discard_partial_chunks": False, "skip_last_n_tokens": 1}),
    ],
)
def test_kv_moves_through_lmcaches_connector_in_the_roles_kv_role(
    role: Role, kv_role: str, extra: dict[str, Any] | None
) -> None:
    transfer = json_flag(command(settings(role=role)), "--kv-transfer-config")
    assert transfer.pop("kv_connector") == "LMCacheConnectorV1"
    assert transfer.pop("kv_role") == kv_role
    assert transfer.pop("kv_connector_extra_config", None) == extra
    assert transfer == {}


def test_without_lmcache_there_is_no_kv_transfer_config() -> None:
    assert "--kv-transfer-config" not in command(settings(lmcache=None))


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_disaggregated_role_needs_lmcache(role: Role) -> None:
    with pytest.raises(ValidationError, match="moves KV through LMCache"):
        settings(role=role, lmcache=None)


# LMCache's YAML


def test_lmcache_keeps_256_token_chunks_in_cpu_memory_hashed_like_vllm() -> None:
    assert lmcache_config(settings(lmcache={"maxLocalCpuSize": 20})) == {
        "chunk_size": 256,
        "local_cpu": True,
        "max_local_cpu_size": 20.0,
        "pre_caching_hash_algorithm": "sha256_cbor",
    }


def test_a_prefill_worker_sends_kv_and_tells_the_proxy() -> None:
    config = lmcache_config(
        settings(
            role="prefill", lmcache={"disaggregation": {"proxyHost": "router", "proxyPort": 7600}}
        )
    )
    assert config["enable_pd"] is True
    assert config["pd_role"] == "sender"
    assert (config["pd_proxy_host"], config["pd_proxy_port"]) == ("router", 7600)
    assert config["pd_buffer_size"] == 1 << 30
    assert config["pd_buffer_device"] == "cuda"
    assert config["transfer_channel"] == "nixl"
    assert config["nixl_backends"] == ["UCX"]
    assert config["save_unfull_chunk"] is True
    assert not {"pd_peer_host", "pd_peer_init_port", "pd_peer_alloc_port"} & config.keys()


def test_a_decode_worker_receives_kv_on_one_port_pair_per_gpu_rank() -> None:
    config = lmcache_config(
        settings(
            role="decode",
            tensorParallelSize=2,
            pipelineParallelSize=2,
            lmcache={"disaggregation": {"peerHost": "10.0.0.7"}},
        )
    )
    assert config["enable_pd"] is True
    assert config["pd_role"] == "receiver"
    assert config["pd_peer_host"] == "10.0.0.7"
    assert config["pd_peer_init_port"] == [7300, 7301, 7302, 7303]
    assert config["pd_peer_alloc_port"] == [7400, 7401, 7402, 7403]
    assert config["transfer_channel"] == "nixl"
    assert not {"pd_proxy_host", "pd_proxy_port"} & config.keys()


def test_a_worker_of_both_roles_has_no_pd_settings() -> None:
    assert not any(
        key.startswith("pd_") or key == "enable_pd" for key in lmcache_config(settings())
    )


def test_a_remote_storage_plugin_is_loaded_by_module_and_class() -> None:
    plugin = {
        "name": "shared",
        "modulePath": "my_store.connector",
        "className": "SharedConnector",
        "options": {"url": "http://cache:8080"},
    }
    config = lmcache_config(settings(lmcache={"remoteStoragePlugin": plugin}))
    assert config["remote_storage_plugins"] == ["shared"]
    assert config["extra_config"] == {
        "remote_storage_plugin.shared.module_path": "my_store.connector",
        "remote_storage_plugin.shared.class_name": "SharedConnector",
        "remote_storage_plugin.shared.url": "http://cache:8080",
    }


def test_a_remote_storage_plugin_needs_the_cpu_tier_as_its_buffer() -> None:
    plugin = RemoteStoragePlugin(name="ipfs", module_path="m", class_name="C")
    with pytest.raises(ValidationError, match="localCpu"):
        Lmcache(remote_storage_plugin=plugin, max_local_cpu_size=0)


IPFS_EXTRA_CONFIG = {
    "remote_storage_plugin.ipfs.module_path": "edgellm.kvcache.lmcache",
    "remote_storage_plugin.ipfs.class_name": "IpfsConnectorAdapter",
    "remote_storage_plugin.ipfs.api_url": "http://127.0.0.1:5001",
    "remote_storage_plugin.ipfs.pin_cap_bytes": 20 << 30,
    "remote_storage_plugin.ipfs.max_keys": 65536,
    "remote_storage_plugin.ipfs.timeout": 30.0,
}


@pytest.mark.parametrize("role", ["both", "prefill", "decode"])
def test_an_ipfs_api_loads_edgellms_ipfs_store_in_every_role(role: Role) -> None:
    config = lmcache_config(settings(role=role, lmcache={"ipfs": {"api": "http://127.0.0.1:5001"}}))
    assert config["remote_storage_plugins"] == ["ipfs"]
    assert config["extra_config"] == IPFS_EXTRA_CONFIG
    # The remote backend stages chunks in the CPU tier; a plugin needs no remote_url.
    assert config["local_cpu"] is True
    assert config["max_local_cpu_size"] > 0
    assert "remote_url" not in config
    assert config.get("enable_pd", False) is (role != "both")


def test_without_an_ipfs_api_no_store_is_loaded() -> None:
    assert not {"remote_storage_plugins", "extra_config"} & lmcache_config(settings()).keys()


def test_the_ipfs_store_takes_its_cap_index_file_and_timeout() -> None:
    ipfs = {
        "api": "http://10.0.0.5:5001",
        "pinCapGb": 2,
        "indexPath": "/var/lib/edgellm/lmcache-ipfs.jsonl",
        "maxKeys": 1000,
        "timeout": 5,
    }
    extra = lmcache_config(settings(lmcache={"ipfs": ipfs}))["extra_config"]
    assert extra["remote_storage_plugin.ipfs.api_url"] == "http://10.0.0.5:5001"
    assert extra["remote_storage_plugin.ipfs.pin_cap_bytes"] == 2 << 30
    assert extra["remote_storage_plugin.ipfs.index_path"] == "/var/lib/edgellm/lmcache-ipfs.jsonl"
    assert extra["remote_storage_plugin.ipfs.max_keys"] == 1000
    assert extra["remote_storage_plugin.ipfs.timeout"] == 5.0


@pytest.mark.parametrize("api", ["127.0.0.1:5001", "", "ftp://host:5001"])
def test_the_ipfs_api_must_be_an_http_url(api: str) -> None:
    with pytest.raises(ValidationError, match="api"):
        Lmcache.model_validate({"ipfs": {"api": api}})


def test_the_ipfs_store_needs_the_cpu_tier_as_its_buffer() -> None:
    with pytest.raises(ValidationError, match="localCpu"):
        Lmcache.model_validate({"ipfs": {"api": "http://127.0.0.1:5001"}, "localCpu": False})


def test_another_plugin_loads_beside_the_ipfs_store_but_not_under_its_name() -> None:
    other = {"name": "shared", "modulePath": "my_store", "className": "C"}
    config = lmcache_config(
        settings(lmcache={"remoteStoragePlugin": other, "ipfs": {"api": "http://127.0.0.1:5001"}})
    )
    assert config["remote_storage_plugins"] == ["shared", "ipfs"]
    assert config["extra_config"]["remote_storage_plugin.shared.class_name"] == "C"
    assert IPFS_EXTRA_CONFIG.items() <= config["extra_config"].items()
    with pytest.raises(ValidationError, match="IPFS store's"):
        Lmcache.model_validate(
            {"remoteStoragePlugin": {**other, "name": "ipfs"}, "ipfs": {"api": "http://x:1"}}
        )


def test_the_ipfs_plugin_names_a_module_and_class_that_exist() -> None:
    # Read, not imported: the module imports lmcache, which only the gpu extra installs.
    spec = importlib.util.find_spec(IPFS_PLUGIN_MODULE)
    assert spec is not None
    assert spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert IPFS_PLUGIN_CLASS in classes


@pytest.mark.parametrize("role", ["both", "prefill", "decode"])
def test_lmcaches_own_loader_reads_the_ipfs_store_settings(role: Role, tmp_path: Path) -> None:
    lmcache_v1_config = pytest.importorskip(
        "lmcache.v1.config", reason="LMCache's config loader comes with the gpu extra"
    )
    generated = lmcache_config(
        settings(role=role, lmcache={"ipfs": {"api": "http://127.0.0.1:5001"}})
    )
    path = tmp_path / "lmcache.yaml"
    path.write_text(yaml.safe_dump(generated))
    config = lmcache_v1_config.LMCacheEngineConfig.from_file(str(path))
    config.validate()
    assert not generated.keys() - config._config_definitions.keys()  # no key LMCache ignores
    assert config.remote_storage_plugins == ["ipfs"]
    assert config.extra_config == IPFS_EXTRA_CONFIG
    assert config.local_cpu is True
    assert config.max_local_cpu_size > 0
    assert config.remote_url is None


def test_a_remote_url_is_passed_only_when_set() -> None:
    assert "remote_url" not in lmcache_config(settings())
    assert lmcache_config(settings(lmcache={"remoteUrl": "lm://cache:65432"}))["remote_url"] == (
        "lm://cache:65432"
    )


def test_chunks_are_whole_vllm_blocks() -> None:
    with pytest.raises(ValidationError, match="multiple"):
        Lmcache(chunk_size=100)


def test_the_lmcache_config_survives_yaml() -> None:
    config = lmcache_config(settings(role="decode"))
    assert yaml.safe_load(yaml.safe_dump(config)) == config


# Environment


def test_the_environment_sets_the_hash_seed_and_the_lmcache_config(tmp_path: Path) -> None:
    env = environment(settings(pythonHashSeed=42), tmp_path / "lmcache.yaml")
    assert env == {
        "PYTHONHASHSEED": "42",
        "LMCACHE_CONFIG_FILE": str(tmp_path / "lmcache.yaml"),
    }


def test_without_lmcache_only_the_hash_seed_is_set(tmp_path: Path) -> None:
    assert environment(settings(lmcache=None), tmp_path / "x.yaml") == {"PYTHONHASHSEED": "0"}


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("fd00::7", "http://[fd00::7]:8000"),
        ("gpu-1.lan", "http://gpu-1.lan:8000"),
    ],
)
def test_a_wildcard_listen_address_is_reached_over_loopback(host: str, url: str) -> None:
    assert base_url(settings(host=host)) == url


# A pipeline over machines


def big_model(**overrides: Any) -> VllmSettings:
    return settings(
        model="/models/llama-70b",
        servedModelName="llama-70b",
        host="0.0.0.0",
        pythonHashSeed=42,
        kvEvents={"enabled": False},
        **overrides,
    )


def peers(*stages: tuple[str, int]) -> list[StagePeer]:
    return [StagePeer(address=address, gpus=gpus) for address, gpus in stages]


def pipeline_argv(tp: int, pp: int, nnodes: int, rank: int, port: str = "29501") -> list[str]:
    """`vllm serve` for one rank of big_model's pipeline, as vLLM's multi-node docs start it."""
    return [
        "vllm", "serve", "/models/llama-70b",
        "--host", "0.0.0.0",
        "--port", "8000",
        "--served-model-name", "llama-70b",
        "--tensor-parallel-size", str(tp),
        "--pipeline-parallel-size", str(pp),
        "--gpu-memory-utilization", "0.9",
        "--distributed-executor-backend", "mp",
        "--nnodes", str(nnodes),
        "--node-rank", str(rank),
        "--master-addr", "10.0.0.1",
        "--master-port", port,
        *(["--headless"] if rank else []),
        "--enable-prefix-caching",
        "--prefix-caching-hash-algo", "sha256_cbor",
        "--block-size", "16",
        "--enable-prompt-tokens-details",
        "--kv-transfer-config", '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}',
    ]  # fmt: skip


def test_two_machines_run_one_stage_each_and_only_rank_0_serves_the_api(tmp_path: Path) -> None:
    head, stage = pipeline_ranks(big_model(), peers(("10.0.0.1", 1), ("10.0.0.2", 1)))
    assert command(head) == pipeline_argv(tp=1, pp=2, nnodes=2, rank=0)
    assert command(stage) == pipeline_argv(tp=1, pp=2, nnodes=2, rank=1)
    assert (head.headless, stage.headless) == (False, True)
    config = tmp_path / "lmcache.yaml"
    assert environment(head, config) == {
        "PYTHONHASHSEED": "42",
        "LMCACHE_CONFIG_FILE": str(config),
        "VLLM_HOST_IP": "10.0.0.1",
    }
    assert environment(stage, config) == {
        "PYTHONHASHSEED": "42",
        "LMCACHE_CONFIG_FILE": str(config),
        "VLLM_HOST_IP": "10.0.0.2",
    }


def test_three_machines_split_tensors_inside_each_and_the_pipeline_across(tmp_path: Path) -> None:
    ranks = pipeline_ranks(
        big_model(), peers(("10.0.0.1", 2), ("10.0.0.2", 4), ("10.0.0.3", 2)), master_port=29600
    )
    assert [command(rank) for rank in ranks] == [
        pipeline_argv(tp=2, pp=3, nnodes=3, rank=rank, port="29600") for rank in range(3)
    ]
    # The peer with 4 GPUs lends 2: vLLM runs as many GPU workers on every machine.
    assert [rank.gpus_per_node for rank in ranks] == [2, 2, 2]
    assert [environment(rank, tmp_path)["VLLM_HOST_IP"] for rank in ranks] == [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
    ]
    assert {environment(rank, tmp_path)["PYTHONHASHSEED"] for rank in ranks} == {"42"}


def test_every_rank_keeps_the_models_own_settings() -> None:
    base = big_model(maxModelLen=8192, port=8100, extraArgs=["--enforce-eager"])
    for rank in pipeline_ranks(base, peers(("gpu-a.lan", 1), ("gpu-b.lan", 1))):
        kept = {"tensor_parallel_size", "pipeline_parallel_size", "multi_node"}
        assert rank.model_dump(exclude=kept) == base.model_dump(exclude=kept)
        assert rank.multi_node is not None
        assert rank.multi_node.master_addr == "gpu-a.lan"


def test_a_machine_joins_a_pipeline_it_was_told_about_by_hand() -> None:
    # Pure pipeline over 2 machines of 2 GPUs, as over GPUs without NVLink.
    node = {"nnodes": 2, "nodeRank": 1, "masterAddr": "10.0.0.1", "nodeAddress": "10.0.0.2"}
    stage = settings(pipelineParallelSize=4, multiNode=node)
    assert stage.gpus_per_node == 2
    argv = command(stage)
    assert (flag(argv, "--nnodes"), flag(argv, "--node-rank")) == ("2", "1")
    assert "--headless" in argv
    assert settings().gpus_per_node == 1
    assert not settings().headless
    assert "--nnodes" not in command(settings())
    assert "VLLM_HOST_IP" not in environment(settings(), Path("x.yaml"))


def multi_node_settings(tp: int, pp: int, nnodes: int, **overrides: Any) -> VllmSettings:
    node = {"nnodes": nnodes, "nodeRank": 0, "masterAddr": "h", "nodeAddress": "h"}
    return settings(tensorParallelSize=tp, pipelineParallelSize=pp, multiNode=node, **overrides)


def test_a_rank_must_be_below_the_number_of_machines() -> None:
    with pytest.raises(ValidationError, match="nodeRank 2 is not below nnodes 2"):
        MultiNode(nnodes=2, node_rank=2, master_addr="h", node_address="h")
    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        MultiNode(nnodes=1, node_rank=0, master_addr="h", node_address="h")


def test_gpu_workers_must_split_evenly_over_the_machines() -> None:
    with pytest.raises(ValidationError, match=r"3 GPU workers .* do not split evenly over 2 nodes"):
        multi_node_settings(tp=1, pp=3, nnodes=2)


@pytest.mark.parametrize(("tp", "pp", "nnodes"), [(2, 1, 2), (4, 1, 2), (2, 3, 2)])
def test_a_tensor_parallel_group_stays_inside_one_machine(tp: int, pp: int, nnodes: int) -> None:
    with pytest.raises(ValidationError, match=f"groups of {tp} GPUs would span machines"):
        multi_node_settings(tp, pp, nnodes)


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_disaggregated_role_does_not_span_machines(role: Role) -> None:
    with pytest.raises(ValidationError, match=f"role {role} cannot span machines"):
        multi_node_settings(tp=1, pp=2, nnodes=2, role=role)


def test_a_pipeline_plan_needs_two_distinct_machines() -> None:
    with pytest.raises(ValueError, match="two peers or more"):
        pipeline_ranks(big_model(), peers(("10.0.0.1", 8)))
    with pytest.raises(ValueError, match="repeats one"):
        pipeline_ranks(big_model(), peers(("10.0.0.1", 1), ("10.0.0.1", 1)))


# The completion request (vLLM's stream itself is read by the WorkerClient: test_worker_client)


def test_the_request_maps_every_sampling_parameter() -> None:
    sampling = Sampling(
        max_tokens=64,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        seed=7,
        stop=("\n\n", "END"),
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        ignore_eos=True,
    )
    request = completion_request("llama-8b", "Once", sampling)
    assert request.model_dump(exclude_defaults=True) == {
        "model": "llama-8b",
        "prompt": "Once",
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 7,
        "stop": ["\n\n", "END"],
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "ignore_eos": True,
    }


def test_an_unset_seed_is_left_to_vllm_and_kv_transfer_params_pass_through() -> None:
    params = {"disagg_spec": {"req_id": "r1", "receiver_host": "10.0.0.7"}}
    body = completion_request("m", "p", Sampling(), params).model_dump(exclude_none=True)
    assert "seed" not in body
    assert body["kv_transfer_params"] == params


# The process


def fake_vllm(tmp_path: Path, script: str) -> str:
    path = tmp_path / "vllm"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


def test_a_vllm_that_dies_at_start_is_reported_with_its_exit_code_and_output(
    tmp_path: Path,
) -> None:
    executable = fake_vllm(
        tmp_path,
        'echo "INFO loading $2"\necho "ValueError: no CUDA GPUs are available" >&2\nexit 3',
    )
    backend = VllmBackend(settings(executable=executable, port=1), tmp_path / "work")
    with pytest.raises(VllmStartError) as caught:
        asyncio.run(backend.start())
    message = str(caught.value)
    assert "exited with code 3" in message
    assert "INFO loading /models/llama-8b" in message
    assert "no CUDA GPUs are available" in message
    assert (tmp_path / "work" / "lmcache.yaml").exists()


def test_a_vllm_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    executable = fake_vllm(tmp_path, "trap '' TERM\nwhile true; do sleep 0.1; done")
    backend = VllmBackend(
        settings(executable=executable, port=1),
        tmp_path / "work",
        startup_timeout=0.5,
        stop_grace=0.5,
    )
    with pytest.raises(VllmStartError, match="not healthy"):
        asyncio.run(backend.start())


def pipeline_stage(executable: str, rank: int) -> VllmSettings:
    node = {"nnodes": 2, "nodeRank": rank, "masterAddr": "10.0.0.1", "nodeAddress": "10.0.0.2"}
    return settings(executable=executable, port=1, pipelineParallelSize=2, multiNode=node)


def test_a_headless_rank_is_started_once_it_outlives_the_grace(tmp_path: Path) -> None:
    # Runs only when told it is headless and where it lives; otherwise fails the start.
    executable = fake_vllm(
        tmp_path,
        '[ "$VLLM_HOST_IP" = 10.0.0.2 ] || exit 7\n'
        'case " $* " in *" --headless "*) exec sleep 60;; esac\nexit 9',
    )
    backend = VllmBackend(pipeline_stage(executable, 1), tmp_path / "work", headless_grace=0.5)

    async def scenario() -> None:
        await backend.start()  # no /health: port 1 answers nothing
        try:
            with pytest.raises(HeadlessRankError, match="headless rank serves no requests"):
                await backend.tokenize("hi")
            job = GenerationJob("r", "hi", Sampling())
            with pytest.raises(HeadlessRankError, match="headless rank serves no requests"):
                await backend.generate(job, Run(Usage(), threading.Event(), lambda _: None))
        finally:
            await backend.stop()

    asyncio.run(scenario())


def test_a_headless_rank_that_dies_fails_the_start_at_once(tmp_path: Path) -> None:
    executable = fake_vllm(tmp_path, 'echo "RuntimeError: cannot reach 10.0.0.1:29501" >&2\nexit 4')
    backend = VllmBackend(pipeline_stage(executable, 1), tmp_path / "work", headless_grace=60)
    with pytest.raises(VllmStartError, match="exited with code 4") as caught:
        asyncio.run(asyncio.wait_for(backend.start(), 10))
    assert "cannot reach 10.0.0.1:29501" in str(caught.value)


def test_rank_0_of_a_pipeline_waits_for_its_api(tmp_path: Path) -> None:
    executable = fake_vllm(tmp_path, "exec sleep 60")
    backend = VllmBackend(
        pipeline_stage(executable, 0), tmp_path / "work", startup_timeout=0.5, headless_grace=0
    )
    with pytest.raises(VllmStartError, match="not healthy"):
        asyncio.run(backend.start())


def test_a_chat_is_rendered_with_the_model_folders_own_template(tmp_path: Path) -> None:
    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template + "<assistant>", "bos_token": {"content": "<s>"}})
    )
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    backend = VllmBackend(settings(model=str(tmp_path)), tmp_path / "work")
    chat = [{"role": "user", "content": "hi"}]
    assert backend.chat_prompt(chat) == "<s><user>hi<assistant>"
    assert backend.context == 4096
    assert VllmBackend(settings(model=str(tmp_path), maxModelLen=1024), tmp_path).context == 1024


def test_a_chat_for_a_model_without_a_template_is_refused_clearly(tmp_path: Path) -> None:
    backend = VllmBackend(settings(model="meta-llama/Llama-3.1-8B"), tmp_path)
    with pytest.raises(NoChatTemplateError, match="send a prompt rather than messages"):
        backend.chat_prompt([{"role": "user", "content": "hi"}])
    assert backend.context == 0
