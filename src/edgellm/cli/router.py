"""`edgellm router`: the OpenAI-compatible, KV-cache-aware router of one member cluster."""

from pathlib import Path
from typing import Annotated

import typer
import uvicorn
import yaml

from edgellm.cli._common import (
    KubeconfigOption,
    SchedulerProfileOption,
    VerboseOption,
    configure_logging,
    connect,
    load_profile,
    one_line_errors,
)
from edgellm.router.app import RouterSettings, create_app
from edgellm.router.policies import Policy
from edgellm.router.statuspage import StatusAccess


def _tokenizers(pairs: list[str]) -> dict[str, Path]:
    found = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        if not name or not path or not Path(path).is_file():
            raise typer.BadParameter(
                f"{pair!r} is not MODEL=PATH of a GGUF file", param_hint="--tokenizer"
            )
        found[name] = Path(path)
    return found


def run_router(
    kubeconfig: KubeconfigOption = None,
    cluster: Annotated[
        str | None, typer.Option(help="This cluster's name: its own peers win close calls.")
    ] = None,
    namespace: Annotated[str, typer.Option(help="Namespace of the API keys' Secret.")] = "default",
    api_keys_secret: Annotated[
        str, typer.Option(help="Secret whose entries are API keys, named by who holds them.")
    ] = "edgellm-router-api-keys",
    anonymous: Annotated[
        bool, typer.Option(help="Serve requests without a key too (a laptop, not a cluster).")
    ] = False,
    rate_limit: Annotated[
        str, typer.Option(help="Requests per key, e.g. 10/second or 600/minute.")
    ] = "600/minute",
    max_body_bytes: Annotated[int, typer.Option(help="Larger request bodies get 413.")] = 1 << 20,
    policy: Annotated[
        Policy,
        typer.Option(
            help="kv-aware (EdgeLLM's), or a baseline: approx-prefix, least-load, round-robin."
        ),
    ] = "kv-aware",
    scheduler_profile: SchedulerProfileOption = None,
    hash_seed: Annotated[
        str,
        typer.Option(
            envvar="PYTHONHASHSEED", help="The workers' --hash-seed, for KV block hashes."
        ),
    ] = "0",
    tokenizer: Annotated[
        list[str],
        typer.Option(
            help="MODEL=PATH of its GGUF file: tokenize here, not on a worker (repeatable)."
        ),
    ] = [],  # noqa: B006 -- typer reads the default, never mutates it
    peers_file: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="YAML of PeerNode objects to route to, instead of a cluster's (needs"
            " --anonymous: keys live in the cluster).",
        ),
    ] = None,
    peer_refresh: Annotated[
        float, typer.Option(help="Seconds between listings of the peers.")
    ] = 2.0,
    failure_cooldown: Annotated[
        float, typer.Option(help="Seconds a worker that failed a request is left out.")
    ] = 10.0,
    status_page: Annotated[
        StatusAccess,
        typer.Option(
            help="Who sees the status page (/) without an API key: loopback (callers on this"
            " machine, kubectl port-forward included) or keys (nobody). Browsers send a key as"
            " the password of HTTP Basic authentication."
        ),
    ] = "loopback",
    probe_interval: Annotated[
        float,
        typer.Option(
            help="Seconds between asking each worker for its models and round trip, while"
            " someone watches the status page; 0: never."
        ),
    ] = 10.0,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    verbose: VerboseOption = False,
) -> None:
    """Serve /v1/chat/completions, /v1/completions and /v1/models over the federation's
    workers, with /healthz, /metrics and a status page at / (its JSON at /v1/federation)."""
    configure_logging(verbose)
    settings = RouterSettings(
        cluster=cluster,
        namespace=namespace,
        api_keys_secret=api_keys_secret,
        anonymous=anonymous,
        rate_limit=rate_limit,
        max_body_bytes=max_body_bytes,
        policy=policy,
        profile=None if scheduler_profile is None else load_profile(scheduler_profile),
        hash_seed=hash_seed,
        tokenizers=_tokenizers(tokenizer),
        peer_refresh_seconds=peer_refresh,
        failure_cooldown_seconds=failure_cooldown,
        status_page=status_page,
        probe_interval_seconds=probe_interval,
    )
    if peers_file is not None:
        if not anonymous:
            raise typer.BadParameter("needs --anonymous", param_hint="--peers-file")
        listed = [body for body in yaml.safe_load_all(peers_file.read_text()) if body]
        app = create_app(settings, static_peers=listed)
    else:
        with one_line_errors():
            app = create_app(settings, connect(kubeconfig, None))
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning")
