"""The vLLM backend: one model served by `vllm serve` on the GPUs of this peer.

The worker runtime builds `VllmSettings` from the peer's placement (model, role, parallelism);
the worker's HTTP layer starts `VllmBackend` and asks it for generations, which it streams from
vLLM's own OpenAI API through the `WorkerClient` (vLLM is an OpenAI server as EdgeLLM's workers
are) as the same `Piece`s as the llama.cpp backend. vLLM runs as a child process: the pure
functions `command`, `lmcache_config` and `environment` say exactly how it is started, so they
are tested without a GPU, and vLLM itself is never imported (it is the optional `gpu` extra).

Every worker of the federation hashes prompt blocks the same way, so that one KV index serves
them all: sha256 over canonical CBOR (`sha256_cbor`, portable across processes and
languages), 16-token blocks, and one `PYTHONHASHSEED`, which vLLM hashes as the seed of the
first block's parent (`NONE_HASH`). LMCache hashes its 256-token chunks with the same
function, and, as the prefill or decode half of a disaggregated request, sends or receives KV
over NIXL.

Flags, JSON keys and YAML keys were read from the sources of vllm 0.33.0
(`vllm/engine/arg_utils.py`, `vllm/config/{kv_events,kv_transfer,cache}.py`,
`vllm/entrypoints/common/cli_args.py`, `vllm/entrypoints/openai/completion/`) and lmcache
0.5.6 (`lmcache/v1/config.py`, `lmcache/v1/storage_backend/pd_backend_async.py`,
`lmcache/integration/vllm/vllm_v1_adapter.py`), and LMCache's `examples/disagg_prefill`.
With `lmcache.ipfs` set, LMCache also keeps its chunks in this peer's IPFS daemon through
EdgeLLM's remote storage plugin (`edgellm.kvcache.lmcache`, loaded by LMCache inside vLLM; it
is read from `lmcache/v1/storage_backend/connector/__init__.py`: `remote_storage_plugins` and
`extra_config` keys `remote_storage_plugin.<name>.module_path` / `.class_name` / options).

A model larger than one machine's GPUs runs as a pipeline over several machines with vLLM's
multiprocessing executor, without Ray (`MultiNode`; `pipeline_ranks` plans every rank from the
ordered stage peers). Every machine runs the same `vllm serve` plus `--nnodes`, its own
`--node-rank`, and `--master-addr`/`--master-port`: rank 0's torch.distributed rendezvous. Rank
0 serves the OpenAI API and schedules; the other ranks run `--headless`, GPU workers with no
HTTP server, so their backend counts as started once vLLM has outlived its own checks rather
than when `/health` answers. Each machine runs tensor x pipeline / nnodes GPU workers (global
rank = node rank x that + local rank, tensor-parallel groups innermost), must let vLLM see
exactly that many GPUs (`CUDA_VISIBLE_DEVICES`, or a pod's GPU limit: vLLM tells which ranks
share a machine by dividing ranks by the GPUs it sees), and must hold the model folder at the
same path. `VLLM_HOST_IP` is each machine's own address: rank 0's scheduler queues and every
rank's result queue bind to it, and vLLM otherwise guesses it from the default route.
`PYTHONHASHSEED` is set alike on every rank (LMCache hashes chunks in each GPU worker). A
machine with several interfaces may need `NCCL_SOCKET_IFNAME`/`GLOO_SOCKET_IFNAME` (torch's and
NCCL's own variables, passed through from the worker's environment). Read from vllm 0.33.0:
`vllm/engine/arg_utils.py` (the flags; `create_engine_config` checks that nnodes divides the
world size and node_rank < nnodes), `vllm/config/parallel.py` (`local_world_size`; `mp` is
implied by nnodes > 1 on CUDA only, so it is passed explicitly),
`vllm/entrypoints/cli/serve.py` (`run_headless`), `vllm/v1/executor/multiproc_executor.py`,
`vllm/distributed/parallel_state.py` (`init_distributed_environment`),
`vllm/distributed/device_communicators/shm_broadcast.py`, `vllm/envs.py`, and the docs'
`docs/serving/parallelism_scaling.md` ("Running vLLM with MultiProcessing").

Errors::

    VllmError
    ├── VllmStartError       `vllm serve` exited while starting, or was not healthy by the
    │                        deadline
    ├── NoChatTemplateError  messages sent to a model without a chat template (an
    │                        `InvalidJobError`: 400)
    └── HeadlessRankError    a request reached a rank of a pipeline other than 0 (an
                             `UnsupportedError`: 501)

What vLLM refuses (a prompt over its context) or fails comes as the `WorkerClient`'s
`WorkerRefusedError` or `WorkerFailedError`, which the worker answers as vLLM did.
"""

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, Self

import httpx
import yaml
from jinja2 import Template  # chat templates, as the llama.cpp backend renders GGUF ones
from pydantic import ConfigDict, Field, model_validator

from edgellm.api._common import Model
from edgellm.kvcache import DEFAULT_BLOCK_SIZE, DEFAULT_TOPIC
from edgellm.worker.backend import (
    Generation,
    GenerationJob,
    InvalidJobError,
    NoKVSharing,
    Run,
    UnsupportedError,
    completion_request,
    stream_pieces,
)
from edgellm.worker.child import ChildServer, ChildStartError
from edgellm.workerapi.client import WorkerClient
from edgellm.workerapi.protocol import TokenizeCompletionRequest

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode", "both"]
TransferChannel = Literal["nixl", "mock_memory"]

PREFIX_CACHING_HASH_ALGO: Final = "sha256_cbor"
"""vLLM's `--prefix-caching-hash-algo` and LMCache's `pre_caching_hash_algorithm`: the only
choice whose hashes another process (the KV index) can recompute."""
BLOCK_SIZE: Final = DEFAULT_BLOCK_SIZE
"""Tokens per vLLM KV block, the unit of KV events and of the index (which hashes with it)."""
LMCACHE_CONNECTOR: Final = "LMCacheConnectorV1"
IPFS_PLUGIN_NAME: Final = "ipfs"
"""The IPFS store's name in `remote_storage_plugins`: LMCache hands a plugin named `ipfs` (or
`ipfs.<instance>`) to the adapter below, which matches plugins by that type."""
IPFS_PLUGIN_MODULE: Final = "edgellm.kvcache.lmcache"
IPFS_PLUGIN_CLASS: Final = "IpfsConnectorAdapter"
MASTER_PORT: Final = 29501
"""vLLM's default `--master-port` (vllm/config/parallel.py: ParallelConfig.master_port)."""

# vLLM's kv_role for each EdgeLLM role (vllm/config/kv_transfer.py: KVRole).
_KV_ROLES: Final[dict[Role, str]] = {
    "prefill": "kv_producer",
    "decode": "kv_consumer",
    "both": "kv_both",
}


class VllmError(Exception):
    """Base of the vLLM backend's errors."""


class VllmStartError(VllmError):
    """`vllm serve` exited, or did not become healthy before the deadline."""


class NoChatTemplateError(VllmError, InvalidJobError):
    """Messages were sent, but the model has no chat template to render them with."""


class HeadlessRankError(VllmError, UnsupportedError):
    """A request reached a headless rank of a pipeline over machines: rank 0 serves them."""


class KvEvents(Model):
    """vLLM's KV-cache events (block stored, block removed, all cleared), published for the
    KV index over ZMQ."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = True
    """Publish events; the scheduler routes by them, so only tests turn this off."""
    endpoint: str = Field(default="tcp://*:5557", min_length=1)
    """The ZMQ PUB socket vLLM binds."""
    topic: str = DEFAULT_TOPIC
    """The topic of every published frame."""
    replay_endpoint: str | None = None
    """A ZMQ ROUTER socket from which a subscriber that missed events can ask for them again."""


class RemoteStoragePlugin(Model):
    """An LMCache remote storage connector loaded by module and class (EdgeLLM's IPFS store)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=63)
    """The plugin's name in LMCache's `remote_storage_plugins`."""
    module_path: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")
    """The module that defines the connector class."""
    class_name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """A `RemoteConnector` (or `ConnectorAdapter`) subclass in that module."""
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """The plugin's own settings, given to it as `remote_storage_plugin.<name>.<key>`."""


class IpfsStore(Model):
    """LMCache's chunks in this peer's Kubo daemon, shared with other peers over IPFS."""

    model_config = ConfigDict(frozen=True)

    api: str = Field(pattern=r"^https?://[^\s/]+", max_length=2048)
    """The Kubo RPC API, e.g. http://127.0.0.1:5001."""
    pin_cap_gb: float = Field(default=20.0, gt=0)
    """GB of chunks kept pinned; the least recently used are unpinned first."""
    index_path: str | None = Field(default=None, min_length=1)
    """A file that remembers which IPFS manifest holds each LMCache chunk, so that a restarted
    worker finds the chunks it stored; in memory only when unset."""
    max_keys: int = Field(default=65536, gt=0)
    """Chunks the index remembers, the least recently used forgotten first."""
    timeout: float = Field(default=30.0, gt=0)
    """Seconds one IPFS call may take."""

    def options(self) -> dict[str, str | int | float | bool]:
        """The plugin's own settings (edgellm.kvcache.lmcache reads them by these names)."""
        options: dict[str, str | int | float | bool] = {
            "api_url": self.api,
            "pin_cap_bytes": int(self.pin_cap_gb * (1 << 30)),  # GB as LMCache counts them
            "max_keys": self.max_keys,
            "timeout": self.timeout,
        }
        if self.index_path is not None:
            options["index_path"] = self.index_path
        return options


class Disaggregation(Model):
    """How a prefill worker sends KV to a decode worker through LMCache (its P/D backend)."""

    model_config = ConfigDict(frozen=True)

    proxy_host: str = "localhost"
    """Prefill: the host of the proxy that a prefill worker tells when a transfer is done."""
    proxy_port: int = Field(default=7500, ge=1, le=65535)
    """Prefill: that proxy's port (a ZMQ PULL socket)."""
    peer_host: str = "localhost"
    """Decode: the address this decode worker receives KV on."""
    peer_init_port: int = Field(default=7300, ge=1, le=65535)
    """Decode: the first NIXL handshake port; each GPU rank takes the next one."""
    peer_alloc_port: int = Field(default=7400, ge=1, le=65535)
    """Decode: the first buffer-allocation port; each GPU rank takes the next one."""
    buffer_size: int = Field(default=1 << 30, gt=0)
    """Bytes of the transfer buffer of each rank."""
    buffer_device: Literal["cuda", "cpu"] = "cuda"
    """Where the transfer buffer lives."""
    transfer_channel: TransferChannel = "nixl"
    """How KV moves: NIXL, or LMCache's in-memory mock for tests."""
    nixl_backends: tuple[str, ...] = ("UCX",)
    """NIXL's transports."""


class Lmcache(Model):
    """LMCache under vLLM: a CPU tier of KV chunks, remote storage, and the P/D transfer."""

    model_config = ConfigDict(frozen=True)

    chunk_size: int = Field(default=256, gt=0)
    """Tokens per LMCache chunk: a whole number of vLLM blocks, so that the index can map one
    to the other."""
    local_cpu: bool = True
    """Keep chunks in host memory."""
    max_local_cpu_size: float = Field(default=5.0, ge=0)
    """Host memory for chunks, in GB."""
    remote_url: str | None = None
    """An LMCache server (`lm://host:port`); LMCache 0.5.6 deprecates it for plugins."""
    remote_storage_plugin: RemoteStoragePlugin | None = None
    """Another remote store of chunks, loaded by module and class."""
    ipfs: IpfsStore | None = None
    """Keep chunks in this peer's IPFS daemon (EdgeLLM's plugin), where other peers find them."""
    disaggregation: Disaggregation = Field(default_factory=Disaggregation)
    """The P/D transfer, used when the worker's role is prefill or decode."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.chunk_size % BLOCK_SIZE:
            raise ValueError(f"chunkSize must be a multiple of vLLM's {BLOCK_SIZE}-token blocks")
        # LMCache's remote backends stage chunks in the local CPU tier.
        remote = self.remote_storage_plugin is not None or self.ipfs is not None
        if remote and not (self.local_cpu and self.max_local_cpu_size > 0):
            raise ValueError("a remote storage plugin needs localCpu and maxLocalCpuSize > 0")
        plugin = self.remote_storage_plugin
        if self.ipfs is not None and plugin is not None and plugin.name == IPFS_PLUGIN_NAME:
            raise ValueError(f"the plugin name {IPFS_PLUGIN_NAME!r} is the IPFS store's")
        return self

    def plugins(self) -> list[RemoteStoragePlugin]:
        """The remote storage plugins LMCache loads, the IPFS store last."""
        plugins = [self.remote_storage_plugin] if self.remote_storage_plugin else []
        if self.ipfs is not None:
            plugins.append(
                RemoteStoragePlugin(
                    name=IPFS_PLUGIN_NAME,
                    module_path=IPFS_PLUGIN_MODULE,
                    class_name=IPFS_PLUGIN_CLASS,
                    options=self.ipfs.options(),
                )
            )
        return plugins


class MultiNode(Model):
    """This machine's place in a pipeline over several machines (vLLM's multiprocessing
    executor across nodes)."""

    model_config = ConfigDict(frozen=True)

    nnodes: int = Field(ge=2)
    """Machines the model is split over."""
    node_rank: int = Field(ge=0)
    """This machine's rank: 0 serves the API, the others run headless."""
    master_addr: str = Field(min_length=1)
    """Rank 0's address, which every rank reaches (torch.distributed's rendezvous)."""
    master_port: int = Field(default=MASTER_PORT, ge=1, le=65535)
    """Rank 0's rendezvous port."""
    node_address: str = Field(min_length=1)
    """This machine's address that the other ranks reach (VLLM_HOST_IP)."""

    @model_validator(mode="after")
    def _rank_in_range(self) -> Self:
        if self.node_rank >= self.nnodes:
            raise ValueError(
                f"nodeRank {self.node_rank} is not below nnodes {self.nnodes}: ranks count from 0"
            )
        return self


class StagePeer(Model):
    """A GPU peer that holds one stage of a pipeline over several machines."""

    model_config = ConfigDict(frozen=True)

    address: str = Field(min_length=1)
    """The address the other stages reach it at."""
    gpus: int = Field(ge=1)
    """Its GPUs free for the model."""


class VllmSettings(Model):
    """One `vllm serve`: the model, where it listens, how it is split over GPUs, its role."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(min_length=1)
    """A local model folder or a Hugging Face model id."""
    served_model_name: str = Field(min_length=1)
    """The name requests use, as peers list it in spec.models."""
    host: str = "127.0.0.1"
    """Address vLLM's HTTP server listens on."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Port vLLM's HTTP server listens on."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    """GPUs each layer is split over."""
    pipeline_parallel_size: int = Field(default=1, ge=1)
    """Stages the layers are split into."""
    max_model_len: int | None = Field(default=None, ge=1)
    """The context length; the model's own when unset."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """The fraction of each GPU's memory vLLM may take."""
    role: Role = "both"
    """prefill (sends KV to a decode worker), decode (receives it) or both."""
    kv_events: KvEvents = Field(default_factory=KvEvents)
    """Where KV-cache events are published."""
    python_hash_seed: int = Field(default=0, ge=0, le=4294967295)
    """PYTHONHASHSEED; equal on every worker, or block hashes differ between them."""
    lmcache: Lmcache | None = Field(default_factory=Lmcache)
    """LMCache's settings; None runs vLLM alone (role both only)."""
    executable: str = "vllm"
    """The `vllm` command."""
    extra_args: tuple[str, ...] = ()
    """More `vllm serve` flags, after EdgeLLM's (e.g. --enforce-eager, --dtype half)."""
    multi_node: MultiNode | None = None
    """This machine's place in a pipeline over several machines; None serves from this one."""

    @model_validator(mode="after")
    def _disaggregation_needs_lmcache(self) -> Self:
        if self.role != "both" and self.lmcache is None:
            raise ValueError(f"role {self.role} moves KV through LMCache: lmcache must be set")
        return self

    @model_validator(mode="after")
    def _splits_evenly_over_machines(self) -> Self:
        if self.multi_node is None:
            return self
        nodes, tp = self.multi_node.nnodes, self.tensor_parallel_size
        if self.role != "both":
            raise ValueError(
                f"role {self.role} cannot span machines: LMCache's P/D names one host for"
                " every rank"
            )
        if self.world_size % nodes:
            raise ValueError(
                f"{self.world_size} GPU workers (tensorParallelSize x pipelineParallelSize) do"
                f" not split evenly over {nodes} nodes: vLLM runs as many on every node"
            )
        if self.gpus_per_node % tp:
            raise ValueError(
                f"tensor-parallel groups of {tp} GPUs would span machines of"
                f" {self.gpus_per_node} GPUs: their per-layer all-reduce needs a machine's"
                " own links; split over machines with pipelineParallelSize"
            )
        return self

    @property
    def world_size(self) -> int:
        """GPU processes of this server: LMCache numbers its P/D ports by their rank."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def gpus_per_node(self) -> int:
        """GPU workers on each machine, as vLLM counts them: world size / nnodes."""
        return self.world_size // (self.multi_node.nnodes if self.multi_node else 1)

    @property
    def headless(self) -> bool:
        """A rank of a pipeline over machines other than 0: GPU workers only, no HTTP."""
        return self.multi_node is not None and self.multi_node.node_rank > 0


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def kv_events_config(settings: VllmSettings) -> dict[str, Any]:
    """vLLM's `--kv-events-config` (vllm/config/kv_events.py: KVEventsConfig)."""
    events = settings.kv_events
    config: dict[str, Any] = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": events.endpoint,
        "topic": events.topic,
    }
    if events.replay_endpoint:
        config["replay_endpoint"] = events.replay_endpoint
    return config


def kv_transfer_config(settings: VllmSettings) -> dict[str, Any] | None:
    """vLLM's `--kv-transfer-config` (vllm/config/kv_transfer.py: KVTransferConfig), or None
    without LMCache."""
    if settings.lmcache is None:
        return None
    config: dict[str, Any] = {
        "kv_connector": LMCACHE_CONNECTOR,
        "kv_role": _KV_ROLES[settings.role],
    }
    # Keys LMCache's connector reads (lmcache/integration/vllm/vllm_v1_adapter.py), as its
    # disaggregated-prefill examples set them: the sender keeps a prompt's last partial
    # chunk, and the receiver leaves the last prompt token to vLLM, which must compute it to
    # sample the first output token.
    if settings.role == "prefill":
        config["kv_connector_extra_config"] = {"discard_partial_chunks": False}
    elif settings.role == "decode":
        config["kv_connector_extra_config"] = {
            "discard_partial_chunks": False,
            "skip_last_n_tokens": 1,
        }
    return config


def command(settings: VllmSettings) -> list[str]:
    """The argv that starts vLLM's OpenAI-compatible server for `settings`."""
    argv = [
        settings.executable,
        "serve",
        settings.model,
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--served-model-name",
        settings.served_model_name,
        "--tensor-parallel-size",
        str(settings.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(settings.pipeline_parallel_size),
        "--gpu-memory-utilization",
        str(settings.gpu_memory_utilization),
    ]
    node = settings.multi_node
    if node is not None:
        argv += [
            # vLLM implies mp for nnodes > 1 on CUDA only; AMD peers need it said.
            "--distributed-executor-backend",
            "mp",
            "--nnodes",
            str(node.nnodes),
            "--node-rank",
            str(node.node_rank),
            "--master-addr",
            node.master_addr,
            "--master-port",
            str(node.master_port),
        ]
        if settings.headless:
            argv.append("--headless")
    if settings.max_model_len is not None:
        argv += ["--max-model-len", str(settings.max_model_len)]
    argv += [
        "--enable-prefix-caching",
        "--prefix-caching-hash-algo",
        PREFIX_CACHING_HASH_ALGO,
        "--block-size",
        str(BLOCK_SIZE),
        # usage.prompt_tokens_details.cached_tokens: the cache hits a request's status reports.
        "--enable-prompt-tokens-details",
    ]
    if settings.kv_events.enabled:
        argv += ["--kv-events-config", _json(kv_events_config(settings))]
    transfer = kv_transfer_config(settings)
    if transfer is not None:
        argv += ["--kv-transfer-config", _json(transfer)]
    return argv + list(settings.extra_args)


def lmcache_config(settings: VllmSettings) -> dict[str, Any]:
    """The LMCache YAML (lmcache/v1/config.py's keys) for `settings`; empty without LMCache."""
    lm = settings.lmcache
    if lm is None:
        return {}
    config: dict[str, Any] = {
        "chunk_size": lm.chunk_size,
        "local_cpu": lm.local_cpu,
        "max_local_cpu_size": lm.max_local_cpu_size,
        # LMCache's default ("builtin") is Python's hash(): not recomputable by the index.
        "pre_caching_hash_algorithm": PREFIX_CACHING_HASH_ALGO,
    }
    if lm.remote_url:
        config["remote_url"] = lm.remote_url
    plugins = lm.plugins()
    if plugins:
        config["remote_storage_plugins"] = [plugin.name for plugin in plugins]
        config["extra_config"] = {}
        for plugin in plugins:
            prefix = f"remote_storage_plugin.{plugin.name}"
            config["extra_config"] |= {
                f"{prefix}.module_path": plugin.module_path,
                f"{prefix}.class_name": plugin.class_name,
                **{f"{prefix}.{key}": value for key, value in plugin.options.items()},
            }
    if settings.role == "both":
        return config
    pd = lm.disaggregation
    config |= {
        "enable_pd": True,
        "pd_role": "sender" if settings.role == "prefill" else "receiver",
        "pd_buffer_size": pd.buffer_size,
        "pd_buffer_device": pd.buffer_device,
        "transfer_channel": pd.transfer_channel,
        "nixl_backends": list(pd.nixl_backends),
        # P/D must send a prompt's last, partial chunk too; LMCache forces this (with a
        # warning) when it is not set.
        "save_unfull_chunk": True,
    }
    if settings.role == "prefill":
        config |= {"pd_proxy_host": pd.proxy_host, "pd_proxy_port": pd.proxy_port}
    else:
        # One port per GPU rank (LMCache indexes these lists by the rank of vLLM's worker).
        ranks = range(settings.world_size)
        config |= {
            "pd_peer_host": pd.peer_host,
            "pd_peer_init_port": [pd.peer_init_port + rank for rank in ranks],
            "pd_peer_alloc_port": [pd.peer_alloc_port + rank for rank in ranks],
        }
    return config


def environment(settings: VllmSettings, config_path: Path) -> dict[str, str]:
    """Variables vLLM needs on top of the worker's own environment."""
    env = {"PYTHONHASHSEED": str(settings.python_hash_seed)}
    if settings.lmcache is not None:
        env["LMCACHE_CONFIG_FILE"] = str(config_path)
    if settings.multi_node is not None:
        env["VLLM_HOST_IP"] = settings.multi_node.node_address
    return env


def pipeline_ranks(
    settings: VllmSettings, peers: Sequence[StagePeer], master_port: int = MASTER_PORT
) -> list[VllmSettings]:
    """The settings of every rank of `settings`' model split over `peers`, stage by stage.

    vLLM's layout for several machines: tensor parallelism inside each machine, one pipeline
    stage per machine; `settings`' parallel sizes are replaced. The first peer is rank 0,
    which serves the API and hosts the rendezvous; the others run headless. vLLM runs as many
    GPU workers on every machine, so a peer with more GPUs than the fewest lends only that
    many, and must show vLLM only those.
    """
    if len(peers) < 2:
        raise ValueError("a pipeline over machines needs two peers or more")
    addresses = [peer.address for peer in peers]
    if len(set(addresses)) < len(addresses):
        raise ValueError(f"each rank needs its own machine, but {addresses} repeats one")
    gpus = min(peer.gpus for peer in peers)
    return [
        VllmSettings.model_validate(
            settings.model_dump()
            | {
                "tensor_parallel_size": gpus,
                "pipeline_parallel_size": len(peers),
                "multi_node": MultiNode(
                    nnodes=len(peers),
                    node_rank=rank,
                    master_addr=addresses[0],
                    master_port=master_port,
                    node_address=address,
                ),
            }
        )
        for rank, address in enumerate(addresses)
    ]


def base_url(settings: VllmSettings) -> str:
    """Where to reach the server: a wildcard listen address is reached over loopback."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def _model_file(model: str, name: str) -> dict[str, Any] | None:
    """A JSON file of a local model folder; None for a hub id or a missing file."""
    path = Path(model) / name
    if not path.is_file():
        return None
    loaded = json.loads(path.read_text())
    return loaded if isinstance(loaded, dict) else None


def _token_text(token: Any) -> str:
    # tokenizer_config.json writes special tokens as strings or as {"content": ...}.
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return str(token or "")


class VllmBackend(NoKVSharing):
    """`vllm serve` as a child process, and generation over its OpenAI API."""

    no_prefill = "the vLLM backend moves KV with LMCache, not /v1/prefill"

    def __init__(
        self,
        settings: VllmSettings,
        workdir: Path,
        *,
        startup_timeout: float = 1800.0,
        stop_grace: float = 30.0,
        read_timeout: float = 600.0,
        headless_grace: float = 60.0,
    ) -> None:
        """`workdir` receives the LMCache YAML and vLLM's log. Loading a large model from a
        slow disk takes many minutes, hence the long default `startup_timeout`. A headless
        rank answers nothing: it counts as started once it has run `headless_grace` seconds,
        the time vLLM's own checks (flags, model config, GPUs) take to fail; whether the
        pipeline is whole shows in rank 0's health alone."""
        self.settings = settings
        self.workdir = workdir
        self.read_timeout = read_timeout
        self.url = base_url(settings)
        self.config_path = workdir / "lmcache.yaml"
        self.log_path = workdir / "vllm.log"
        self._child = ChildServer(
            "vllm serve",
            None if settings.headless else f"{self.url}/health",
            self.log_path,
            startup_timeout=startup_timeout,
            stop_grace=stop_grace,
            quiet_grace=headless_grace,
        )
        self._client: WorkerClient | None = None

    @property
    def context(self) -> int:
        """The context length: max_model_len, else the local model's config; 0 when unknown."""
        if self.settings.max_model_len is not None:
            return self.settings.max_model_len
        config = _model_file(self.settings.model, "config.json")
        return int(config.get("max_position_embeddings", 0)) if config else 0

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """A chat rendered with the local model's own template (tokenizer_config.json), as
        vLLM's chat endpoint would, so the worker API is the same for both backends."""
        config = _model_file(self.settings.model, "tokenizer_config.json") or {}
        template = config.get("chat_template")
        if not isinstance(template, str):
            raise NoChatTemplateError(
                f"{self.settings.model} has no chat template in tokenizer_config.json:"
                " send a prompt rather than messages"
            )
        return str(
            Template(template).render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=_token_text(config.get("bos_token")),
                eos_token=_token_text(config.get("eos_token")),
            )
        )

    def running(self, in_flight: int) -> int:
        return in_flight  # vLLM batches every request it has

    def _api(self) -> WorkerClient:
        if self._client is not None:
            return self._client
        if self.settings.headless:
            raise HeadlessRankError("a headless rank serves no requests: rank 0's worker does")
        raise RuntimeError("vLLM is not started")

    async def tokenize(self, text: str) -> list[int]:
        """The prompt's tokens, from vLLM's own tokenizer (its /tokenize endpoint)."""
        request = TokenizeCompletionRequest(model=self.settings.served_model_name, prompt=text)
        return await self._api().tokenize(self.url, request)

    def _prepare(self) -> None:
        """Writes the LMCache YAML."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.settings.lmcache is not None:
            self.config_path.write_text(yaml.safe_dump(lmcache_config(self.settings)))

    async def start(self) -> None:
        """Starts vLLM and returns once it answers `/health`, or, headless, once it has run
        `headless_grace` seconds."""
        await asyncio.to_thread(self._prepare)
        if not self.settings.headless:
            self._client = WorkerClient(timeout=httpx.Timeout(10.0, read=self.read_timeout))
        env = environment(self.settings, self.config_path)
        try:
            await self._child.start(command(self.settings), env)
        except ChildStartError as e:
            await self.stop()
            raise VllmStartError(str(e)) from e

    async def stop(self) -> None:
        """Asks vLLM to shut down (it stops its engine and workers on SIGTERM), and kills its
        whole session if it has not after a grace."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        await self._child.stop()

    async def generate(self, job: GenerationJob, run: Run) -> Generation:
        """Streams the generation from vLLM; closing it closes the HTTP stream, and vLLM
        aborts a request whose client left. `kv_transfer_params` go to LMCache's connector (a
        disaggregated request's `disagg_spec`)."""
        if job.kv_from is not None:
            raise UnsupportedError("the vLLM backend moves KV with LMCache, not kv_from")
        if job.split is not None:
            raise InvalidJobError("a vLLM worker serves its model whole, without split plans")
        request = completion_request(
            self.settings.served_model_name, job.prompt, job.sampling, job.kv_transfer_params
        )
        return Generation(stream_pieces(self._api(), self.url, request, run.usage), run)
