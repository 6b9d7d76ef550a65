"""`edgellm crds`: the CRD YAML generated from the API models."""

from pathlib import Path
from typing import Annotated

import typer

from edgellm.api import crd_files

DEFAULT_CRD_DIRS = [Path("crds"), Path("charts/edgellm/crds")]


def crds(
    out: Annotated[
        list[Path] | None, typer.Option(help="Directory to write into; repeatable.")
    ] = None,
    check: Annotated[
        bool, typer.Option(help="Write nothing; fail if the files differ from the models.")
    ] = False,
) -> None:
    """Write the CRD YAML generated from the API models (crds/ and the Helm chart)."""
    stale = []
    for directory in out or DEFAULT_CRD_DIRS:
        for name, text in crd_files().items():
            path = directory / name
            current = path.read_text() if path.exists() else None
            if current == text:
                continue
            if check:
                stale.append(str(path))
            else:
                directory.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                typer.echo(f"wrote {path}")
    if stale:
        typer.echo(
            f"edgellm: CRDs differ from the models: {', '.join(stale)}; run `edgellm crds`",
            err=True,
        )
        raise typer.Exit(1)
