"""Where the pinned tool binaries live, and a clear error when one is missing.

`hack/tools.sh` puts them in `$EDGELLM_CACHE/bin` (default `~/.cache/edgellm/bin`); the local
clusters, the tests and the benchmarks find them here.
"""

import os
from pathlib import Path

from edgellm.dev.errors import MissingToolError

CACHE_ENV = "EDGELLM_CACHE"


def cache_dir() -> Path:
    """EdgeLLM's cache: pinned binaries, generated models, default local-cluster state."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/edgellm").expanduser()


def tool(name: str) -> Path:
    """The path of a pinned binary (or of KWOK's stages), e.g. `tool("kube-apiserver")`."""
    path = cache_dir() / "bin" / name
    if not path.is_file():
        raise MissingToolError(
            f"{name} is not in {path.parent}: run hack/tools.sh (or `make tools`) first"
        )
    return path
