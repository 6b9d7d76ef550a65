"""Leading a model split across peers: `edgellm worker --split`.

The peer holds the weights of a model too large for it. Each generation carries the plan the
scheduler made (`SplitPlan`: how many layers this peer keeps, and which peers' llama.cpp RPC
servers hold the rest). The model runs in a child `edgellm worker` that loads it across those
servers, started for a plan and kept while plans repeat; a new plan restarts it.

A stage that dies makes llama.cpp abort the child. The stream then breaks off, and this
worker names the stages that no longer answer (`StageLostError`), so that the scheduler plans
again without them and resumes the request from what was generated.
"""

import asyncio
import dataclasses
import json
import socket
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Final

import httpx
from jinja2 import Template
from llama_cpp import Llama
from pydantic import Field

from edgellm.api._common import Model
from edgellm.worker import rpc
from edgellm.worker.child import ChildServer
from edgellm.worker.llamacpp import Piece, PromptTooLongError, Sampling, Usage

MAX_STAGES: Final = 15  # GGML_RPC_MAX_SERVERS is 16 devices; one stays for growth
STAGE_ENDPOINT_PATTERN: Final = r"^[A-Za-z0-9.-]+:[0-9]{1,5}$"


class RemoteStage(Model):
    endpoint: str = Field(pattern=STAGE_ENDPOINT_PATTERN, max_length=260)
    """host:port of the peer's llama.cpp RPC server."""
    layers: int = Field(ge=1, le=4096)
    """The consecutive layers it holds, after the previous stage's."""


class SplitPlan(Model):
    """How a generation's model is split: this peer's first layers, then each stage's."""

    context: int = Field(ge=16, le=1 << 20)
    """Tokens of context the split is loaded with; its KV cache is on the layers' peers."""
    leader_layers: int = Field(ge=1, le=4096)
    """The first layers, which the leading peer keeps."""
    stages: list[RemoteStage] = Field(min_length=1, max_length=MAX_STAGES)


class SplitError(Exception):
    """The split's child failed, and every stage still answers: this peer's own failure."""


class StageLostError(SplitError):
    """Stages of the split stopped answering."""

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(f"the split lost its stage(s) {', '.join(endpoints)}")
        self.endpoints = endpoints


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SplitLeader:
    """A worker backend for a model served split: the plan comes with each generation."""

    def __init__(
        self,
        model: Path,
        name: str,
        workdir: Path,
        threads: int | None = None,
        startup_timeout: float = 600.0,
    ) -> None:
        self.model_path = model
        self.name = name
        self.workdir = workdir
        self.threads = threads
        self.startup_timeout = startup_timeout
        # The vocabulary alone (no weights): chat templates and tokens without the model.
        self._vocabulary = Llama(model_path=str(model), vocab_only=True, verbose=False)
        self._plan: SplitPlan | None = None
        self._child: ChildServer | None = None
        self._url = ""
        self._turn = asyncio.Lock()  # one plan at a time: a stage serves one leader

    @property
    def context(self) -> int:
        return self._plan.context if self._plan else 0

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        template = self._vocabulary.metadata.get("tokenizer.chat_template", "")
        return str(Template(template).render(messages=messages, add_generation_prompt=True))

    async def tokenize_async(self, text: str) -> list[int]:
        return list(self._vocabulary.tokenize(text.encode(), add_bos=True, special=True))

    async def _load(self, plan: SplitPlan) -> None:
        """Runs the child for `plan`, unless it already runs for it."""
        if self._child is not None and self._child.running and plan == self._plan:
            return
        await self.stop()
        endpoints = [stage.endpoint for stage in plan.stages]
        if lost := [e for e in endpoints if not await asyncio.to_thread(rpc.reachable, e)]:
            raise StageLostError(lost)  # llama.cpp would abort on them
        port = _free_port()
        layers = [plan.leader_layers, *(stage.layers for stage in plan.stages)]
        argv = [
            sys.executable, "-m", "edgellm", "worker",
            f"--model={self.model_path}", f"--name={self.name}",
            "--host=127.0.0.1", f"--port={port}", f"--context={plan.context}",
            f"--rpc-servers={','.join(endpoints)}",
            f"--layers={','.join(map(str, layers))}",
        ]  # fmt: skip
        if self.threads:
            argv.append(f"--threads={self.threads}")
        self._url = f"http://127.0.0.1:{port}"
        self._child = ChildServer(
            "the split's leader",
            f"{self._url}/healthz",
            self.workdir / "split-leader.log",
            startup_timeout=self.startup_timeout,
            stop_grace=5.0,
        )
        self._plan = plan
        try:
            await self._child.start(argv, {})
        except Exception as e:
            self._plan = None
            raise await self._failure(plan) from e

    async def _failure(self, plan: SplitPlan) -> SplitError:
        """What broke: the stages that no longer answer, or else this peer's child."""
        probes = [asyncio.to_thread(rpc.reachable, s.endpoint) for s in plan.stages]
        answers = await asyncio.gather(*probes)
        lost = [s.endpoint for s, up in zip(plan.stages, answers, strict=True) if not up]
        if lost:
            return StageLostError(lost)
        log = self._child.log_path if self._child else self.workdir
        return SplitError(f"the split's leader failed; see {log}")

    async def stream(
        self, prompt: str, continuation: str, sampling: Sampling, usage: Usage, plan: SplitPlan
    ) -> AsyncGenerator[Piece, None]:
        """Yields the generation's pieces from the child, as the llama.cpp backend would."""
        payload = {
            "prompt": prompt,
            "continuation": continuation,
            "sampling": {**dataclasses.asdict(sampling), "stop": list(sampling.stop)},
            "stream": True,
        }
        async with self._turn:
            await self._load(plan)
            finished = False
            try:
                async with (
                    httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None)) as http,
                    http.stream("POST", f"{self._url}/v1/generate", json=payload) as response,
                ):
                    if response.status_code == 400:
                        error = json.loads(await response.aread())["error"]["message"]
                        raise PromptTooLongError(error)
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line.removeprefix("data: "))
                        if "text" in event:
                            usage.completion_tokens = event["tokens"]
                            yield Piece(event["text"])
                            continue
                        counts = event["usage"]
                        usage.prompt_tokens = counts["promptTokens"]
                        usage.completion_tokens = counts["completionTokens"]
                        usage.cached_tokens = counts["cachedTokens"]
                        usage.first_token_seconds = counts["firstTokenSeconds"]
                        finished = True
                        yield Piece("", event["finishReason"])
            except httpx.HTTPError:
                pass  # judged below, with the stages probed
            if not finished:
                raise await self._failure(plan)

    async def stop(self) -> None:
        if self._child is not None:
            await self._child.stop()
        self._child = None
