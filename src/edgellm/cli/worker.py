"""`edgellm worker`: serve one model with llama.cpp over the worker HTTP API."""

from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from edgellm.cli._common import VerboseOption, configure_logging
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
    verbose: VerboseOption = False,
) -> None:
    """Serve a GGUF model: generate (whole or streamed), cancel, /healthz and /metrics."""
    configure_logging(verbose)
    backend = LlamaCppBackend(model, threads=threads)
    app = create_app(backend, name or model.stem)
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning")
