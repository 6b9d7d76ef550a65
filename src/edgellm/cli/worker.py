"""`edgellm worker`: serve one model over the worker HTTP API, with llama.cpp or vLLM."""

import re
import tempfile
from pathlib import Path
from typing import Annotated, Literal

import typer
import uvicorn

from edgellm.api._common import QUANTITY_PATTERN, quantity_value
from edgellm.cli._common import KVEventsTopicOption, VerboseOption, configure_logging
from edgellm.kvcache import DEFAULT_BLOCK_SIZE
from edgellm.kvcache.blockstore import KVBlockStore
from edgellm.kvcache.ipfs import KuboClient
from edgellm.worker.ipfskv import IPFSKV, key_id, load_or_create_key, load_trusted_keys, public_pem
from edgellm.worker.kvevents import KVBlockTracker, KVEvents, ZmqEventPublisher
from edgellm.worker.llamacpp import LlamaCppBackend
from edgellm.worker.server import Backend, create_app
from edgellm.worker.vllm import KvEvents, VllmBackend, VllmSettings

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
    kv_events_topic: KVEventsTopicOption = "kv-events",
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
    verbose: VerboseOption = False,
) -> None:
    """Serve a model: generate (whole or streamed), cancel, /healthz and /metrics."""
    configure_logging(verbose)
    served: Backend
    events = None
    if backend == "vllm":
        if not hash_seed.isdigit():
            raise typer.BadParameter(
                "vLLM needs a numeric PYTHONHASHSEED", param_hint="--hash-seed"
            )
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
        )
        served = VllmBackend(settings, Path(tempfile.mkdtemp(prefix="edgellm-vllm-")))
    else:
        if not model.is_file():
            raise typer.BadParameter("llamacpp serves a GGUF file", param_hint="--model")
        served = LlamaCppBackend(model, threads=threads)
        if kv_events is not None:
            tracker = KVBlockTracker(hash_seed, DEFAULT_BLOCK_SIZE)
            events = KVEvents(tracker, ZmqEventPublisher(kv_events, topic=kv_events_topic))
    ipfs_kv = None
    if ipfs_api is not None:
        if not isinstance(served, LlamaCppBackend):
            raise typer.BadParameter("vLLM moves KV with LMCache", param_hint="--ipfs-api")
        ipfs_kv = _ipfs_kv(
            served,
            ipfs_api,
            ipfs_key,
            ipfs_trusted,
            ipfs_min_tokens,
            ipfs_pin_cap,
            hash_seed,
            events,
        )
    app = create_app(served, name or model.stem, events, ipfs_kv=ipfs_kv)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning")
    finally:
        if events is not None:
            events.publisher.close()


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
