"""The Dockerfiles in images/, read statically: pinned bases, a builder and a runtime stage, a
non-root numeric user, `edgellm` as the entry point with a subcommand that exists, a target per
component named as the chart's default images. The images themselves are built with podman and
run in pods by tests/e2e/test_in_cluster.py.
"""

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.core
import typer.main
import yaml

from edgellm.cli import app

ROOT = Path(__file__).parents[2]
IMAGES = ROOT / "images"
CPU = IMAGES / "Dockerfile"
GPU = IMAGES / "Dockerfile.gpu"
DOCKERFILES = [CPU, GPU]
COMPONENTS = ("operator", "router", "worker")
PORTS = {"operator": "9090", "router": "8080", "worker": "8600"}
# An exact version: a tag with a patch number (3.11.16-slim-bookworm, v0.11.0), or a digest.
PINNED = re.compile(r"^[^:@\s]+(:v?\d+\.\d+\.\d+[\w.-]*)?(@sha256:[0-9a-f]{64})?$")
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments (also inside them) dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "a continuation line ends the file"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Each stage's instructions, its FROM first (global ARGs before the first are left out)."""
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    args: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            name, _, default = instruction.arguments.partition("=")
            args[name] = default
    return args


def base_images(instructions: list[Instruction]) -> list[str]:
    """Each FROM's image with global ARGs substituted; a FROM of an earlier stage is left out."""
    args = global_args(instructions)
    names: set[str] = set()
    images = []
    for instruction in instructions:
        if instruction.keyword != "FROM":
            continue
        words = instruction.arguments.split()
        words = [word for word in words if not word.startswith("--platform")]
        image = VARIABLE.sub(lambda m: args[m.group(1) or m.group(2)], words[0])
        if len(words) == 3 and words[1].upper() == "AS":
            names.add(words[2])
        if image not in names:
            images.append(image)
    return images


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.arguments)
    assert isinstance(value, list)
    assert all(isinstance(item, str) for item in value)
    return value


def last(stage: list[Instruction], keyword: str) -> tuple[int, Instruction]:
    found = [(i, ins) for i, ins in enumerate(stage) if ins.keyword == keyword]
    assert found, f"no {keyword} in the stage"
    return found[-1]


def named_stages(path: Path) -> dict[str, list[Instruction]]:
    """Each stage by its name (FROM ... AS name); an unnamed stage by its position."""
    named = {}
    for i, stage in enumerate(stages(parse(path.read_text()))):
        words = stage[0].arguments.split()
        named[words[2] if len(words) == 3 and words[1].upper() == "AS" else str(i)] = stage
    return named


def image_stage(path: Path, target: str) -> list[Instruction]:
    """A target's instructions, those of the stage it is built FROM included, first."""
    named = named_stages(path)
    stage = named[target]
    parent = stage[0].arguments.split()[0]
    return [*image_stage(path, parent), *stage[1:]] if parent in named else stage


@pytest.fixture(
    params=[(CPU, c) for c in COMPONENTS] + [(GPU, "1")],
    ids=lambda p: f"{p[0].name}:{p[1]}",
)
def image(request: pytest.FixtureRequest) -> tuple[Path, list[Instruction]]:
    path, target = request.param
    return path, image_stage(path, target)


def test_each_component_is_a_target_of_the_cpu_dockerfile_and_the_worker_has_a_gpu_variant() -> (
    None
):
    assert {"builder", "runtime", *COMPONENTS} == set(named_stages(CPU))
    # The worker is the last stage: a build without --target makes it.
    assert list(named_stages(CPU))[-1] == "worker"
    assert set(named_stages(GPU)) == {"builder", "1"}


def test_the_parser_joins_continuations_and_drops_comments() -> None:
    text = '# c\nFROM a:1.2.3 AS b\nRUN x \\\n    # inside\n    && y\nCMD ["z"]\n'
    assert parse(text) == [
        Instruction("FROM", "a:1.2.3 AS b"),
        Instruction("RUN", "x && y"),
        Instruction("CMD", '["z"]'),
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_base_image_is_pinned_to_an_exact_version(dockerfile: Path) -> None:
    images = base_images(parse(dockerfile.read_text()))
    assert images
    for image in images:
        assert ":latest" not in image
        assert PINNED.match(image), image
        assert ":" in image.rpartition("/")[2] or "@sha256:" in image, f"{image}: no tag or digest"


def test_the_gpu_image_is_the_vllm_release_the_backend_is_written_against() -> None:
    (base,) = set(base_images(parse(GPU.read_text())))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (vllm,) = [d for d in project["optional-dependencies"]["gpu"] if d.startswith("vllm")]
    minimum = re.search(r">=(\d+\.\d+)", vllm)
    assert minimum is not None
    assert base.startswith(f"vllm/vllm-openai:v{minimum.group(1)}.")


def test_runtime_stages_copy_only_the_venv_and_no_compilers(
    image: tuple[Path, list[Instruction]],
) -> None:
    _, instructions = image
    runtime = stages(instructions)[-1]
    copies = [ins.arguments for ins in instructions if ins.keyword == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    # Compilers stay in the builder.
    assert not any("build-essential" in ins.arguments for ins in runtime if ins.keyword == "RUN")


def test_each_image_runs_edgellm_as_a_numeric_non_root_user(
    image: tuple[Path, list[Instruction]],
) -> None:
    _, instructions = image
    user_at, user = last(instructions, "USER")
    entrypoint_at, entrypoint = last(instructions, "ENTRYPOINT")
    assert re.fullmatch(r"\d+(:\d+)?", user.arguments)
    assert all(int(part) != 0 for part in user.arguments.split(":"))
    assert user_at < entrypoint_at
    assert exec_form(entrypoint) == ["edgellm"]


def test_each_image_writes_only_under_tmp_and_is_labelled(
    image: tuple[Path, list[Instruction]],
) -> None:
    _, instructions = image
    env = " ".join(ins.arguments for ins in instructions if ins.keyword == "ENV")
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "HOME=/tmp"):
        assert setting in env
    labels = " ".join(ins.arguments for ins in instructions if ins.keyword == "LABEL")
    for key in ("source", "title", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_target_runs_its_component_s_subcommand_and_exposes_its_port(component: str) -> None:
    instructions = image_stage(CPU, component)
    command = exec_form(last(instructions, "CMD")[1])
    assert command[0] == component
    registered = typer.main.get_command(app)
    assert isinstance(registered, typer.core.TyperGroup)
    assert command[0] in registered.commands
    if component == "router":
        assert command[1:] == ["--host", "0.0.0.0"]
    assert last(instructions, "EXPOSE")[1].arguments == PORTS[component]


def test_the_builders_install_the_repository_and_the_gpu_variant_its_extra() -> None:
    for path in DOCKERFILES:
        runs = [ins.arguments for ins in parse(path.read_text()) if ins.keyword == "RUN"]
        installs = [run for run in runs if "pip install" in run]
        assert installs, path
        if path == GPU:
            assert any("'.[gpu]'" in run for run in installs)
        else:
            assert any(run.endswith(" .") for run in installs)


def test_the_cpu_builder_takes_a_prebuilt_llama_cpp_wheel_of_the_makefile_s_version() -> None:
    builder = named_stages(CPU)["builder"]
    args = dict(ins.arguments.partition("=")[::2] for ins in builder if ins.keyword == "ARG")
    makefile = (ROOT / "Makefile").read_text()
    assert f"LLAMA_CPP_PYTHON ?= {args['LLAMA_CPP_PYTHON']}" in makefile
    runs = " ".join(ins.arguments for ins in builder if ins.keyword == "RUN")
    assert "/wheels/llama_cpp_python-${LLAMA_CPP_PYTHON}-" in runs


def test_each_dockerfile_sends_only_what_its_builder_copies() -> None:
    for path in DOCKERFILES:
        ignore = path.with_name(path.name + ".dockerignore").read_text().splitlines()
        patterns = [line for line in ignore if line and not line.startswith("#")]
        assert patterns[0] == "*"
        allowed = {line[1:] for line in patterns if line.startswith("!")}
        sources: set[str] = set()
        for ins in parse(path.read_text()):
            if ins.keyword == "COPY" and not ins.arguments.startswith("--from"):
                sources.update(word.rstrip("/") for word in ins.arguments.split()[:-1])
        assert sources == allowed


def test_the_chart_s_default_images_are_the_dockerfile_s_targets() -> None:
    values = yaml.safe_load((ROOT / "charts" / "edgellm" / "values.yaml").read_text())
    repositories = {
        "operator": values["operator"]["image"]["repository"],
        "router": values["router"]["image"]["repository"],
        "worker": values["workers"]["image"]["repository"],
    }
    assert repositories == {name: f"ghcr.io/edgellm/{name}" for name in COMPONENTS}
    assert set(COMPONENTS) <= set(named_stages(CPU))
