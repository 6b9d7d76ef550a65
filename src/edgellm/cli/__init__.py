"""The `edgellm` command line: one entry point, a subcommand per job.

Each subcommand is a thin shell over a package function. Expected failures become one readable
line on stderr (plus a log tail where a process failed) and exit code 1.
"""

import typer

from edgellm.cli import (
    dev,
    federation,
    model,
    operator,
    peer,
    resources,
    router,
    stage,
    worker,
)

app = typer.Typer(
    help="EdgeLLM: decentralised LLM inference over a federation of Kubernetes clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(resources.crds)
app.command()(peer.join)
app.command()(peer.leave)
app.command("operator")(operator.run_operator)
app.command("worker")(worker.run_worker)
app.command("router")(router.run_router)
app.command("stage")(stage.run_stage)
app.add_typer(dev.app, name="dev")
app.add_typer(federation.app, name="federation")
app.add_typer(model.app, name="model")


def main() -> None:
    app()


__all__ = ["app", "main"]
