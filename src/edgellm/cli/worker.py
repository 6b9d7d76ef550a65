"""`edgellm worker`: serve one model with llama.cpp over the worker HTTP API."""

from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from edgellm.cli._common import VerboseOption, configure_logging
from edgellm.kvcache import DEFAULT_BLOCK_SIZE
from edgellm.worker.kvevents import KVBlockTracker, KVEvents, ZmqEventPublisher
from edgellm.worker.llamacpp import LlamaCppBackend
from edgellm.worker.server import create_app


def run_worker(
    model: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="A GGUF model file.")],
    name: Annotated[
        str | None, typer.Option(help="The model name requests use (default: the file's stem).")
    ] = None,
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
    kv_events_topic: Annotated[str, typer.Option(help="Topic of the KV events.")] = "kv-events",
    hash_seed: Annotated[
        str,
        typer.Option(
            envvar="PYTHONHASHSEED",
            help="Seed of the block hashes: every worker feeding one index (vLLM ones too, as"
            " their PYTHONHASHSEED) must share it.",
        ),
    ] = "0",
    verbose: VerboseOption = False,
) -> None:
    """Serve a GGUF model: generate (whole or streamed), cancel, /healthz and /metrics."""
    configure_logging(verbose)
    backend = LlamaCppBackend(model, threads=threads)
    events = None
    if kv_events is not None:
        tracker = KVBlockTracker(hash_seed, DEFAULT_BLOCK_SIZE)
        events = KVEvents(tracker, ZmqEventPublisher(kv_events, topic=kv_events_topic))
    app = create_app(backend, name or model.stem, events)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning")
    finally:
        if events is not None:
            events.publisher.close()
