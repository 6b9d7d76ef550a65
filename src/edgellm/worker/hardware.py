"""What this machine can give to EdgeLLM: CPU cores, memory, NVIDIA GPUs and local models.

`edgellm join` calls `resources()` and `local_models()` to fill this machine's PeerNode. GPUs
are read from `nvidia-smi`, which every NVIDIA driver installs; a machine without one (or with a
broken one) is a CPU-only peer, not an error.
"""

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType

from edgellm.api import Accelerator, PeerResources
from edgellm.api.peernode import LocalModel

logger = logging.getLogger(__name__)

NVIDIA_SMI_QUERY = ["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]


def cpu_cores() -> int:
    """Cores this process may use (cgroup and affinity limits included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise ValueError(f"no MemTotal in {meminfo}")


def gpus(nvidia_smi: str = "nvidia-smi") -> list[Accelerator]:
    """NVIDIA GPUs, identical models grouped; [] where nvidia-smi is absent or fails."""
    executable = shutil.which(nvidia_smi)
    if executable is None:
        return []
    try:
        result = subprocess.run(
            [executable, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=10, check=True
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        logger.warning("nvidia-smi failed, joining without GPUs: %s", e)
        return []
    counts: dict[tuple[str, int], int] = {}
    for line in result.stdout.splitlines():
        if not line.strip():
            continue
        name, _, memory_mib = (field.strip() for field in line.rpartition(","))
        try:
            mib = int(float(memory_mib))
        except ValueError:  # "[N/A]" (unified memory, some MIG setups): nothing to offer by
            logger.warning("nvidia-smi reports no memory for %r: left out", name or line)
            continue
        # GPU feature discovery's spelling, so Node-derived and joined peers match.
        key = (name.replace(" ", "-"), mib)
        counts[key] = counts.get(key, 0) + 1
    return [
        Accelerator(vendor="nvidia", model=model, memory=f"{mib}Mi", count=count)
        for (model, mib), count in counts.items()
    ]


def gguf_shape(path: Path) -> tuple[int | None, int | None]:
    """From the GGUF header: its layers, and the KV bytes of one token (keys and values of
    every layer, in llama.cpp's default f16 cache); None where unknown."""
    try:
        fields = GGUFReader(path).fields
        architecture = _gguf_value(fields, "general.architecture")
        layers, width, heads = (
            int(_gguf_value(fields, f"{architecture}.{key}"))
            for key in ("block_count", "embedding_length", "attention.head_count")
        )
        kv_heads = int(_gguf_value(fields, f"{architecture}.attention.head_count_kv") or heads)
    except (OSError, ValueError, KeyError, TypeError):
        return None, None  # not a model llama.cpp describes this way: its shape stays unknown
    return layers, 2 * layers * kv_heads * (width // heads) * 2


def _gguf_value(fields: Mapping[str, Any], key: str) -> Any:
    field = fields[key]
    value = field.parts[field.data[0]]
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(value).decode()
    return value[0]


def local_models(directory: Path) -> list[LocalModel]:
    """GGUF files, and folders of safetensors with a config.json, directly in `directory`."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if path.is_file() and path.suffix == ".gguf":
            layers, kv_bytes_per_token = gguf_shape(path)
            found.append(
                LocalModel(
                    name=path.stem,
                    format="gguf",
                    size_bytes=path.stat().st_size,
                    kv_bytes_per_token=kv_bytes_per_token,
                    layers=layers,
                )
            )
        elif path.is_dir() and (path / "config.json").is_file():
            shards = list(path.glob("*.safetensors"))
            if shards:
                size = sum(s.stat().st_size for s in shards)
                found.append(LocalModel(name=path.name, format="safetensors", size_bytes=size))
    return sorted(found, key=lambda m: m.name)


def resources(memory_fraction: float = 0.8, nvidia_smi: str = "nvidia-smi") -> PeerResources:
    """What the peer offers: all cores, a fraction of memory (the OS keeps the rest), GPUs."""
    memory_mib = int(memory_bytes() * memory_fraction) // 2**20
    return PeerResources(cpu=cpu_cores(), memory=f"{memory_mib}Mi", accelerators=gpus(nvidia_smi))
