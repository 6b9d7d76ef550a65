"""What `edgellm join` detects: GPUs from nvidia-smi, memory, and models on disk."""

from pathlib import Path

import pytest

from edgellm.worker import hardware


def _fake_nvidia_smi(tmp_path: Path, output: str, exit_code: int = 0) -> str:
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}EOF\nexit {exit_code}\n")
    script.chmod(0o755)
    return str(script)


def test_identical_gpus_are_grouped_with_a_count(tmp_path: Path) -> None:
    smi = _fake_nvidia_smi(
        tmp_path,
        "NVIDIA GeForce RTX 4090, 24564\nNVIDIA GeForce RTX 4090, 24564\nNVIDIA RTX A2000, 6138\n",
    )
    found = {(g.model, g.memory, g.count) for g in hardware.gpus(smi)}
    assert found == {
        ("NVIDIA-GeForce-RTX-4090", "24564Mi", 2),
        ("NVIDIA-RTX-A2000", "6138Mi", 1),
    }


def test_a_machine_without_nvidia_smi_has_no_gpus_and_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert hardware.gpus(str(tmp_path / "absent")) == []
    assert caplog.records == []


def test_a_failing_nvidia_smi_means_no_gpus_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    smi = _fake_nvidia_smi(tmp_path, "NVIDIA RTX A2000, 6138\n", exit_code=9)
    assert hardware.gpus(smi) == []
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_a_gpu_without_a_memory_figure_is_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    smi = _fake_nvidia_smi(tmp_path, "NVIDIA GH200 480GB, [N/A]\nNVIDIA RTX A2000, 6138\n")
    assert [(g.model, g.memory) for g in hardware.gpus(smi)] == [("NVIDIA-RTX-A2000", "6138Mi")]
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "GH200" in caplog.records[0].getMessage()


def test_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:        1024 kB\n")
    assert hardware.memory_bytes(meminfo) == 16384 * 1024
    meminfo.write_text("MemFree: 1 kB\n")
    with pytest.raises(ValueError, match="MemTotal"):
        hardware.memory_bytes(meminfo)


def test_models_are_gguf_files_and_safetensors_folders(tmp_path: Path) -> None:
    (tmp_path / "tiny-random.gguf").write_bytes(b"x" * 10)
    (tmp_path / "notes.txt").write_text("not a model")
    llama = tmp_path / "llama-8b"
    llama.mkdir()
    (llama / "config.json").write_text("{}")
    (llama / "model-00001.safetensors").write_bytes(b"y" * 7)
    incomplete = tmp_path / "half-downloaded"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"z")
    models = hardware.local_models(tmp_path)
    assert [(m.name, m.format, m.size_bytes) for m in models] == [
        ("llama-8b", "safetensors", 7),
        ("tiny-random", "gguf", 10),
    ]
    assert hardware.local_models(tmp_path / "missing") == []


def test_resources_offer_cores_most_memory_and_gpus(tmp_path: Path) -> None:
    offered = hardware.resources(0.5, _fake_nvidia_smi(tmp_path, "NVIDIA L4, 23034\n"))
    assert offered.cpu == hardware.cpu_cores()
    assert offered.memory == f"{hardware.memory_bytes() // 2 // 2**20}Mi"
    assert [g.model for g in offered.accelerators] == ["NVIDIA-L4"]
