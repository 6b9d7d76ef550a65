"""The Dockerfiles in images/: read statically (there is no Docker engine where the tests run).

Each is parsed into instructions, then checked for what the chart and the operator rely on:
pinned bases, a builder and a runtime stage, a non-root numeric user, `edgellm` as the entry
point with a subcommand that exists, and image names that match the chart's defaults.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.core
import typer.main
import yaml

from edgellm.cli import app

ROOT = Path(__file__).parents[2]
IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile*"))
DOCKERFILES = [path for path in DOCKERFILES if path.suffix != ".dockerignore"]
COMPONENTS = ("operator", "router", "worker")
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
    assert found, f"no {keyword} in the final stage"
    return found[-1]


@pytest.fixture(params=DOCKERFILES, ids=lambda path: str(path.relative_to(IMAGES)))
def dockerfile(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


def test_every_component_has_a_dockerfile_and_the_worker_a_gpu_variant() -> None:
    assert {path.relative_to(IMAGES).as_posix() for path in DOCKERFILES} == {
        "operator/Dockerfile",
        "router/Dockerfile",
        "worker/Dockerfile",
        "worker/Dockerfile.gpu",
    }


def test_the_parser_joins_continuations_and_drops_comments() -> None:
    text = '# c\nFROM a:1.2.3 AS b\nRUN x \\\n    # inside\n    && y\nCMD ["z"]\n'
    assert parse(text) == [
        Instruction("FROM", "a:1.2.3 AS b"),
        Instruction("RUN", "x && y"),
        Instruction("CMD", '["z"]'),
    ]


def test_every_base_image_is_pinned_to_an_exact_version(dockerfile: Path) -> None:
    images = base_images(parse(dockerfile.read_text()))
    assert images
    for image in images:
        assert ":latest" not in image
        assert PINNED.match(image), image
        assert ":" in image.rpartition("/")[2] or "@sha256:" in image, f"{image}: no tag or digest"


def test_a_builder_stage_and_a_runtime_stage_that_copies_only_the_venv(dockerfile: Path) -> None:
    parsed = stages(parse(dockerfile.read_text()))
    assert len(parsed) >= 2
    final = parsed[-1]
    copies = [ins.arguments for ins in final if ins.keyword == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    # Compilers stay in the builder.
    assert not any("build-essential" in ins.arguments for ins in final if ins.keyword == "RUN")


def test_the_final_stage_runs_edgellm_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    final = stages(parse(dockerfile.read_text()))[-1]
    user_at, user = last(final, "USER")
    entrypoint_at, entrypoint = last(final, "ENTRYPOINT")
    assert re.fullmatch(r"\d+(:\d+)?", user.arguments)
    assert all(int(part) != 0 for part in user.arguments.split(":"))
    assert user_at < entrypoint_at
    assert exec_form(entrypoint) == ["edgellm"]


def test_the_runtime_writes_only_under_tmp_and_is_labelled(dockerfile: Path) -> None:
    final = stages(parse(dockerfile.read_text()))
    env = " ".join(ins.arguments for ins in final[-1] if ins.keyword == "ENV")
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "HOME=/tmp"):
        assert setting in env
    labels = " ".join(ins.arguments for ins in final[-1] if ins.keyword == "LABEL")
    for key in ("source", "title", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels


def test_cmd_is_the_component_s_subcommand_and_it_exists(dockerfile: Path) -> None:
    final = stages(parse(dockerfile.read_text()))[-1]
    command = exec_form(last(final, "CMD")[1])
    component = dockerfile.parent.name
    assert command[0] == component
    registered = typer.main.get_command(app)
    assert isinstance(registered, typer.core.TyperGroup)
    assert command[0] in registered.commands
    if component == "router":
        assert command[1:] == ["--host", "0.0.0.0"]


def test_each_image_exposes_the_port_its_component_listens_on(dockerfile: Path) -> None:
    final = stages(parse(dockerfile.read_text()))[-1]
    port = {"operator": "9090", "router": "8080", "worker": "8600"}[dockerfile.parent.name]
    assert last(final, "EXPOSE")[1].arguments == port


def test_the_builder_installs_the_repository_and_the_gpu_variant_its_extra() -> None:
    for path in DOCKERFILES:
        runs = [ins.arguments for ins in parse(path.read_text()) if ins.keyword == "RUN"]
        installs = [run for run in runs if "pip install" in run]
        assert installs, path
        if path.name == "Dockerfile.gpu":
            assert any("'.[gpu]'" in run for run in installs)
        else:
            assert any(run.endswith(" .") for run in installs)


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


def test_the_chart_s_default_images_are_the_images_folders() -> None:
    values = yaml.safe_load((ROOT / "charts" / "edgellm" / "values.yaml").read_text())
    repositories = {
        "operator": values["operator"]["image"]["repository"],
        "router": values["router"]["image"]["repository"],
        "worker": values["workers"]["image"]["repository"],
    }
    assert repositories == {name: f"ghcr.io/edgellm/{name}" for name in COMPONENTS}
    folders = {path.name for path in IMAGES.iterdir() if path.is_dir()}
    assert folders == set(COMPONENTS)
