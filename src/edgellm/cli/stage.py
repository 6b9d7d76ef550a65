"""`edgellm stage`: lend this machine's memory and cores to models too large for one peer."""

import contextlib
import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Annotated

import typer

from edgellm.api import PeerLoad
from edgellm.cli._common import VerboseOption, configure_logging
from edgellm.worker import rpc


class _Health(BaseHTTPRequestHandler):
    """/healthz for the heartbeats of `edgellm join`: up, and no requests of its own (the
    leader of a split counts them)."""

    def do_GET(self) -> None:
        found = self.path == "/healthz"
        body = json.dumps({"load": PeerLoad().to_wire()} if found else {}).encode()
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: a heartbeat every few seconds is not news


def run_stage(
    host: Annotated[
        str, typer.Option(help="Address to listen on; the RPC protocol has no authentication.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the RPC server.")] = 50052,
    health_port: Annotated[
        int,
        typer.Option(
            help="Port of /healthz, the peer's endpoint for `edgellm join` (its heartbeats read"
            " it)."
        ),
    ] = 8601,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            file_okay=False,
            help="Keep received weights here by hash, so a re-planned split loads faster.",
        ),
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Serve layers of split models with llama.cpp's RPC server, one leading peer at a time;
    `edgellm join --rpc-server HOST:PORT` offers it to the federation."""
    configure_logging(verbose)
    try:
        rpc.check_available()
    except rpc.RPCUnavailableError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    endpoint = f"{host}:{port}"
    cores = threads or os.cpu_count() or 1
    stopped = threading.Event()

    def serve() -> None:
        rpc.serve(endpoint, cores, cache_dir)  # returns only if the server could not start
        stopped.set()

    # The server loops in C: a daemon thread, so that a signal still ends the process.
    server = threading.Thread(target=serve, daemon=True)
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    server.start()
    health = HTTPServer((host, health_port), _Health)
    threading.Thread(target=health.serve_forever, daemon=True).start()
    typer.echo(
        f"serving layers at {endpoint} with {cores} thread(s); health at"
        f" http://{host}:{health_port}/healthz",
        err=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        stopped.wait()
