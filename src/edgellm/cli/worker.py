"""`edgellm worker`: serve one model over the worker HTTP API, with llama.cpp or vLLM."""

import tempfile
from pathlib import Path
from typing import Annotated, Literal

import typer
import uvicorn

from edgellm.cli._common import KVEventsTopicOption, VerboseOption, configure_logging
from edgellm.kvcache import DEFAULT_BLOCK_SIZE
from edgellm.worker.kvevents import KVBlockTracker, KVEvents, ZmqEventPublisher
from edgellm.worker.llamacpp import LlamaCppBackend
from edgellm.worker.server import Backend, create_app
from edgellm.worker.vllm import KvEvents, VllmBackend, VllmSettings


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
    app = create_app(served, name or model.stem, events)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning")
    finally:
        if events is not None:
            events.publisher.close()
