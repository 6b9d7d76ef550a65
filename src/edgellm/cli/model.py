"""`edgellm model tiny|bench`: write a random-weight GGUF model that llama.cpp runs."""

from pathlib import Path
from typing import Annotated

import typer

from edgellm.dev.tools import cache_dir
from edgellm.worker.models import SHAPES, write_model

app = typer.Typer(
    help="Generate small GGUF models with random weights (real to llama.cpp, output is noise).",
    no_args_is_help=True,
)

OutOption = Annotated[
    Path | None,
    typer.Option(help="Where to write it (default: ~/.cache/edgellm/models/<name>.gguf)."),
]
SeedOption = Annotated[int, typer.Option(help="Seed of the random weights.")]


def _write(name: str, out: Path | None, seed: int) -> None:
    path = out or cache_dir() / "models" / f"{name}.gguf"
    write_model(path, SHAPES[name], seed, progress=typer.echo)
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


@app.command()
def tiny(out: OutOption = None, seed: SeedOption = 0) -> None:
    """tiny-random: 2 layers, 64 wide, under 1 MiB; for demos and tests."""
    _write("tiny-random", out, seed)


@app.command()
def bench(out: OutOption = None, seed: SeedOption = 0) -> None:
    """bench-random: 8 layers, 512 wide, 8k context, ~45 MiB; for benchmarks."""
    _write("bench-random", out, seed)
