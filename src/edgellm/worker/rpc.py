"""llama.cpp's RPC backend: a peer lending its memory and cores to a split model (`edgellm
stage`), and a split's leader offloading layers to such peers.

llama-cpp-python binds llama.h, not ggml-rpc.h, so the few RPC functions are called through
ctypes in the libraries it ships; they exist when it was built with `-DGGML_RPC=on` (`make
setup` builds it so). Signatures are those of ggml-rpc.h in llama-cpp-python 0.3.36's llama.cpp
(RPC protocol 7): a leader and its stages must run the same protocol version.

A leader whose RPC server stops answering aborts (ggml-rpc's `RPC_STATUS_ASSERT`), so a split
runs in a child process of the worker (`split.py`), never in the worker itself.
"""

import ctypes
import socket
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Final

import llama_cpp

LIBRARIES: Final = Path(llama_cpp.__file__).parent / "lib"
CPU_DEVICE: Final = 0  # enum ggml_backend_dev_type: GGML_BACKEND_DEVICE_TYPE_CPU


class RPCUnavailableError(RuntimeError):
    """This llama-cpp-python was built without the RPC backend."""


def check_available() -> None:
    """Raises RPCUnavailableError unless llama.cpp has its RPC backend here."""
    if not llama_cpp.llama_supports_rpc():
        raise RPCUnavailableError(
            "llama-cpp-python was built without llama.cpp's RPC backend: reinstall it with"
            " CMAKE_ARGS=-DGGML_RPC=on (`make setup` does)"
        )


@cache
def _libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml (the backend registry) and libggml-rpc, the very copies llama_cpp loaded: by
    their sonames, as libllama needs them; wheels hold `libggml.so` as another copy of the
    file, whose registry llama.cpp never reads."""
    check_available()
    ggml = ctypes.CDLL(str(LIBRARIES / "libggml.so.0"))
    rpc = ctypes.CDLL(str(LIBRARIES / "libggml-rpc.so.0"))
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_register.restype = None
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p,  # endpoint host:port
        ctypes.c_char_p,  # cache directory, or NULL
        ctypes.c_size_t,  # threads
        ctypes.c_size_t,  # devices
        ctypes.POINTER(ctypes.c_void_p),
    ]
    rpc.ggml_backend_rpc_start_server.restype = None
    return ggml, rpc


def serve(endpoint: str, threads: int, cache_dir: Path | None) -> None:
    """Serves this machine's CPU to one leader at a time; returns only if the server fails.

    With `cache_dir`, tensors a leader sent once are kept there by hash, so reloading the
    same model (after a re-plan) sends names rather than weights.
    """
    ggml, rpc = _libraries()
    devices = (ctypes.c_void_p * 1)(ggml.ggml_backend_dev_by_type(CPU_DEVICE))
    directory = str(cache_dir).encode() if cache_dir is not None else None
    rpc.ggml_backend_rpc_start_server(endpoint.encode(), directory, threads, 1, devices)


def use_servers(endpoints: Sequence[str]) -> None:
    """Registers the servers as devices, in order, for the next model this process loads;
    llama.cpp aborts the process if one does not answer, so callers check first."""
    ggml, rpc = _libraries()
    for endpoint in endpoints:
        ggml.ggml_backend_register(rpc.ggml_backend_rpc_add_server(endpoint.encode()))


def reachable(endpoint: str, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections at host:port."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def layer_offload(layers: Sequence[int]) -> tuple[int, list[float]]:
    """llama.cpp's n_gpu_layers and tensor_split for whole-layer counts, the leader's first:
    the leader keeps the first layers on its CPU, each server the next ones in order, and the
    last server also the output head (llama.cpp counts it as one more layer)."""
    remote = list(layers[1:])
    if not remote:
        return 0, []
    return sum(remote) + 1, [float(n) for n in remote[:-1]] + [float(remote[-1] + 1)]
