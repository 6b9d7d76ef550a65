"""`edgellm worker`: serve one model over the worker HTTP API, with llama.cpp or vLLM."""

import re
import tempfile
from pathlib import Path
from typing import Annotated, Literal

import typer
import uvicorn
from pydantic import ValidationError

from edgellm.api._common import QUANTITY_PATTERN, quantity_value
from edgellm.cli._common import KVEventsTopicOption, VerboseOption, configure_logging
from edgellm.kvcache import DEFAULT_BLOCK_SIZE, DEFAULT_TOPIC
from edgellm.kvcache.blockstore import KVBlockStore
from edgellm.kvcache.ipfs import KuboClient
from edgellm.worker import rpc
from edgellm.worker.backend import Backend
from edgellm.worker.ipfskv import IPFSKV, key_id, load_or_create_key, load_trusted_keys, public_pem
from edgellm.worker.kvevents import KVBlockTracker, KVEvents, ZmqEventPublisher
from edgellm.worker.llamacpp import LlamaCppBackend
from edgellm.worker.llamaworker import LlamaCppWorker
from edgellm.worker.metrics import WorkerMetrics
from edgellm.worker.server import create_app
from edgellm.worker.split import SplitLeader
from edgellm.worker.vllm import MASTER_PORT, KvEvents, MultiNode, VllmBackend, VllmSettings

# Seconds for one Kubo call: a decode worker waits on its fetches with the model's turn held.
IPFS_TIMEOUT = 10.0


def run_worker(
    model: Annotated[
        Path,
        typer.Option(exists=True, help="A GGUF file (llamacpp), or a model folder (vllm)."),
    ],
    name: Annotated[
        str | None, typer.Option(help="The model name requests use (default: the file's stem).")
    ] = None,
    backend: Annotated[
        Literal["llamacpp", "vllm"],
        typer.Option(help="llamacpp (CPU) or vllm (GPUs; runs `vllm serve` as a child)."),
    ] = "llamacpp",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8600,
    threads: Annotated[int | None, typer.Option(help="CPU threads for llama.cpp.")] = None,
    kv_events: Annotated[
        str | None,
        typer.Option(
            help="Publish KV events in vLLM's format on this ZMQ endpoint (tcp://*:5557 binds);"
            " off by default."
        ),
    ] = None,
    kv_events_topic: KVEventsTopicOption = DEFAULT_TOPIC,
    hash_seed: Annotated[
        str,
        typer.Option(
            envvar="PYTHONHASHSEED",
            help="Seed of the block hashes: every worker feeding one index (vLLM ones too, as"
            " their PYTHONHASHSEED) must share it.",
        ),
    ] = "0",
    role: Annotated[
        Literal["prefill", "decode", "both"],
        typer.Option(help="vllm: prefill or decode half of a split request (LMCache), or both."),
    ] = "both",
    tensor_parallel_size: Annotated[int, typer.Option(help="vllm: GPUs per layer.")] = 1,
    pipeline_parallel_size: Annotated[int, typer.Option(help="vllm: pipeline stages.")] = 1,
    max_model_len: Annotated[int | None, typer.Option(help="vllm: the context length.")] = None,
    vllm_port: Annotated[int, typer.Option(help="vllm: port of `vllm serve` itself.")] = 8000,
    nnodes: Annotated[
        int,
        typer.Option(
            min=1,
            help="vllm: machines the model is split over (vLLM's multiprocessing executor, no"
            " Ray); each runs this command with its own --node-rank and tensor x pipeline /"
            " nnodes GPU workers.",
        ),
    ] = 1,
    node_rank: Annotated[
        int,
        typer.Option(
            min=0,
            help="vllm: this machine's rank; 0 serves requests, the others run vLLM headless"
            " (GPU workers only) and serve none.",
        ),
    ] = 0,
    master_addr: Annotated[
        str | None,
        typer.Option(help="vllm: rank 0's address, which every machine reaches; with --nnodes."),
    ] = None,
    master_port: Annotated[
        int, typer.Option(min=1, max=65535, help="vllm: rank 0's rendezvous port.")
    ] = MASTER_PORT,
    node_address: Annotated[
        str | None,
        typer.Option(
            help="vllm: this machine's address that the others reach (VLLM_HOST_IP); with --nnodes."
        ),
    ] = None,
    ipfs_api: Annotated[
        str | None,
        typer.Option(
            help="llamacpp: save the KV of long prompts to this Kubo RPC API"
            " (http://127.0.0.1:5001), announce it, and load peers' through it; off by default."
        ),
    ] = None,
    ipfs_key: Annotated[
        Path | None,
        typer.Option(
            dir_okay=False,
            help="PEM Ed25519 private key that signs this peer's announcements (created if"
            " missing; its public key is printed); required with --ipfs-api.",
        ),
    ] = None,
    ipfs_trusted: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="YAML or JSON: label -> PEM Ed25519 public key of each peer whose announced KV"
            " this worker loads (none without it).",
        ),
    ] = None,
    ipfs_min_tokens: Annotated[
        int, typer.Option(min=DEFAULT_BLOCK_SIZE, help="Shorter prompts are not saved to IPFS.")
    ] = 256,
    ipfs_pin_cap: Annotated[
        str,
        typer.Option(help="Most KV bytes kept pinned in IPFS, a quantity (1Gi, 500Mi, 2e9)."),
    ] = "1Gi",
    context: Annotated[
        int, typer.Option(min=0, help="llamacpp: tokens of context (0: the model's own).")
    ] = 0,
    split: Annotated[
        bool,
        typer.Option(
            help="llamacpp: lead this model split across peers, as the plan each generation"
            " carries says (for a model too large for this machine; it is not loaded whole)."
        ),
    ] = False,
    rpc_servers: Annotated[
        str | None,
        typer.Option(
            help="llamacpp: host:port,... of llama.cpp RPC servers (`edgellm stage`) holding"
            " layers after this process's own; with --layers. `--split` passes these itself."
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(help="With --rpc-servers: layers this process keeps, then each server's."),
    ] = None,
    drain_timeout: Annotated[
        int,
        typer.Option(
            min=0,
            help="On SIGTERM or Ctrl-C: seconds to finish the generations running, taking no new"
            " ones, before they are cut off (a scheduler resumes those elsewhere).",
        ),
    ] = 30,
    verbose: VerboseOption = False,
) -> None:
    """Serve a model over OpenAI's API (completions and chat, whole or streamed), with
    EdgeLLM's extensions: cancel, prefill and KV hand-over, /healthz and /metrics."""
    configure_logging(verbose)
    served: Backend
    engine: LlamaCppBackend | SplitLeader | None = None
    events = None
    metrics = WorkerMetrics()
    if backend == "vllm":
        if not hash_seed.isdigit():
            raise typer.BadParameter(
                "vLLM needs a numeric PYTHONHASHSEED", param_hint="--hash-seed"
            )
        try:
            settings = VllmSettings(
                model=str(model),
                served_model_name=name or model.name,
                port=vllm_port,
                tensor_parallel_size=tensor_parallel_size,
                pipeline_parallel_size=pipeline_parallel_size,
                max_model_len=max_model_len,
                role=role,
                kv_events=KvEvents(
                    enabled=kv_events is not None,
                    endpoint=kv_events or "tcp://*:5557",
                    topic=kv_events_topic,
                ),
                python_hash_seed=int(hash_seed),
                multi_node=_multi_node(nnodes, node_rank, master_addr, master_port, node_address),
            )
        except ValidationError as e:
            reasons = (
                f"{'.'.join(map(str, error['loc']))} {error['msg']}".strip()
                for error in e.errors(include_url=False)
            )
            raise typer.BadParameter("; ".join(reasons)) from e
        served = VllmBackend(settings, Path(tempfile.mkdtemp(prefix="edgellm-vllm-")))
    else:
        if not model.is_file():
            raise typer.BadParameter("llamacpp serves a GGUF file", param_hint="--model")
        engine = _llamacpp(model, name, threads, context, split, rpc_servers, layers)
        if kv_events is not None and isinstance(engine, LlamaCppBackend):
            tracker = KVBlockTracker(hash_seed, DEFAULT_BLOCK_SIZE)
            events = KVEvents(tracker, ZmqEventPublisher(kv_events, topic=kv_events_topic))
    ipfs_kv = None
    if ipfs_api is not None:
        if not isinstance(engine, LlamaCppBackend):
            raise typer.BadParameter(
                "only a llama.cpp model served whole shares KV through IPFS (vLLM's go through"
                " LMCache)",
                param_hint="--ipfs-api",
            )
        ipfs_kv = _ipfs_kv(
            engine,
            ipfs_api,
            ipfs_key,
            ipfs_trusted,
            ipfs_min_tokens,
            ipfs_pin_cap,
            hash_seed,
            events,
        )
    if isinstance(engine, LlamaCppBackend):
        served = LlamaCppWorker(engine, metrics=metrics, kv_events=events, ipfs_kv=ipfs_kv)
    elif engine is not None:
        served = engine
    app = create_app(served, name or model.stem, metrics=metrics)
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="info" if verbose else "warning",
            timeout_graceful_shutdown=drain_timeout,
        )
    finally:
        if events is not None:
            events.publisher.close()


def _llamacpp(
    model: Path,
    name: str | None,
    threads: int | None,
    context: int,
    split: bool,
    rpc_servers: str | None,
    layers: str | None,
) -> LlamaCppBackend | SplitLeader:
    if split:
        if rpc_servers:
            raise typer.BadParameter("a split's leader gets its servers from each plan")
        workdir = Path(tempfile.mkdtemp(prefix="edgellm-split-"))
        return SplitLeader(model, name or model.stem, workdir, threads=threads)
    servers = rpc_servers.split(",") if rpc_servers else []
    try:
        counts = [int(n) for n in layers.split(",")] if layers else []
        return LlamaCppBackend(
            model, context=context, threads=threads, rpc_servers=servers, layers=counts
        )
    except (ValueError, rpc.RPCUnavailableError) as e:
        raise typer.BadParameter(str(e), param_hint="--layers") from e


def _multi_node(
    nnodes: int,
    node_rank: int,
    master_addr: str | None,
    master_port: int,
    node_address: str | None,
) -> MultiNode | None:
    """This machine's place in a vLLM pipeline over machines; None when it serves alone."""
    if nnodes == 1 and node_rank == 0:
        return None
    if master_addr is None or node_address is None:
        raise typer.BadParameter(
            "a pipeline over machines needs --master-addr and --node-address",
            param_hint="--nnodes",
        )
    return MultiNode(
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        node_address=node_address,
    )


def _ipfs_kv(
    backend: LlamaCppBackend,
    api: str,
    key_file: Path | None,
    trusted_file: Path | None,
    min_tokens: int,
    pin_cap: str,
    hash_seed: str,
    events: KVEvents | None,
) -> IPFSKV:
    """The worker's IPFS KV cache from its options, with the key created and shown if new."""
    if key_file is None:
        raise typer.BadParameter("--ipfs-api needs a key to sign with", param_hint="--ipfs-key")
    if not re.fullmatch(QUANTITY_PATTERN, pin_cap) or quantity_value(pin_cap) < 1:
        raise typer.BadParameter(f"{pin_cap!r} is not a size", param_hint="--ipfs-pin-cap")
    try:
        key, created = load_or_create_key(key_file)
        trusted = load_trusted_keys(trusted_file) if trusted_file is not None else {}
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    # On stderr whatever the log level: other peers need it in their trusted-keys files.
    typer.echo(
        f"{'created' if created else 'using'} {key_file}; peers trust this worker's IPFS KV"
        f" ({key_id(key.public_key())}) with its public key:\n{public_pem(key)}",
        err=True,
    )
    return IPFSKV(
        KVBlockStore(
            KuboClient(api, timeout=IPFS_TIMEOUT), pin_cap_bytes=int(quantity_value(pin_cap))
        ),
        key,
        trusted,
        model=backend.model_id,
        seed=hash_seed,
        block_size=DEFAULT_BLOCK_SIZE,
        min_tokens=min_tokens,
        publish=events.publisher.publish if events is not None else lambda _: None,
    )
