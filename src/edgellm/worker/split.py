"""Leading a model split across peers: `edgellm worker --split`.

The peer holds the weights of a model too large for it. Each generation carries the plan the
scheduler made (`SplitPlan` of the worker protocol: how many layers this peer keeps, and which
peers' llama.cpp RPC servers hold the rest). The model runs in a child `edgellm worker` that
loads it across those servers, started for a plan and kept while plans repeat; a new plan
restarts it. Generations stream from the child through the `WorkerClient`.

A stage that dies makes llama.cpp abort the child. The stream then breaks off, and this
worker names the stages that no longer answer (`StagesLostError`), so that the scheduler plans
again without them and resumes the request from what was generated; when every stage still
answers, the failure is this peer's own (`WorkerFailedError`).
"""

import asyncio
import socket
import sys
from collections.abc import AsyncGenerator
from pathlib import Path

from jinja2 import Template
from llama_cpp import Llama

from edgellm.worker import rpc
from edgellm.worker.backend import (
    Generation,
    GenerationJob,
    InvalidJobError,
    NoKVSharing,
    Piece,
    Run,
    UnsupportedError,
    Usage,
    completion_request,
    stream_pieces,
)
from edgellm.worker.child import ChildServer
from edgellm.workerapi.client import WorkerClient
from edgellm.workerapi.errors import StagesLostError, WorkerFailedError
from edgellm.workerapi.protocol import SplitPlan


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SplitLeader(NoKVSharing):
    """A worker backend for a model served split: the plan comes with each generation."""

    no_prefill = "a split model is prefilled and decoded by the same peers"

    def __init__(
        self,
        model: Path,
        name: str,
        workdir: Path,
        *,
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
        self._client = WorkerClient()

    @property
    def context(self) -> int:
        return self._plan.context if self._plan else 0

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        template = self._vocabulary.metadata.get("tokenizer.chat_template", "")
        return str(Template(template).render(messages=messages, add_generation_prompt=True))

    async def tokenize(self, text: str) -> list[int]:
        return list(self._vocabulary.tokenize(text.encode(), add_bos=True, special=True))

    def running(self, in_flight: int) -> int:
        return min(in_flight, 1) if self._turn.locked() else 0

    async def start(self) -> None:
        """The child starts with the first plan."""

    async def generate(self, job: GenerationJob, run: Run) -> Generation:
        if job.split is None:
            raise InvalidJobError(
                "this worker leads a split model: each generation needs its split plan"
            )
        if job.kv_from is not None or job.kv_transfer_params is not None:
            raise UnsupportedError("a split model computes its prompts itself, without kv_from")
        return Generation(self._stream(job, job.split, run.usage), run)

    async def _load(self, plan: SplitPlan) -> None:
        """Runs the child for `plan`, unless it already runs for it."""
        if self._child is not None and self._child.running and plan == self._plan:
            return
        await self._stop_child()
        endpoints = [stage.endpoint for stage in plan.stages]
        if lost := [e for e in endpoints if not await asyncio.to_thread(rpc.reachable, e)]:
            raise StagesLostError(lost)  # llama.cpp would abort on them
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

    async def _failure(self, plan: SplitPlan) -> WorkerFailedError:
        """What broke: the stages that no longer answer, or else this peer's child."""
        probes = [asyncio.to_thread(rpc.reachable, s.endpoint) for s in plan.stages]
        answers = await asyncio.gather(*probes)
        lost = [s.endpoint for s, up in zip(plan.stages, answers, strict=True) if not up]
        if lost:
            return StagesLostError(lost)
        log = self._child.log_path if self._child else self.workdir
        return WorkerFailedError(f"the split's leader failed; see {log}")

    async def _stream(
        self, job: GenerationJob, plan: SplitPlan, usage: Usage
    ) -> AsyncGenerator[Piece, None]:
        """The generation's pieces from the child, as the llama.cpp backend would yield them."""
        async with self._turn:
            await self._load(plan)
            request = completion_request(self.name, job.prompt, job.sampling)
            try:
                async for piece in stream_pieces(self._client, self._url, request, usage):
                    yield piece
            except WorkerFailedError as e:  # judged with the stages probed
                raise await self._failure(plan) from e

    async def stop(self) -> None:
        await self._stop_child()
        await self._client.aclose()

    async def _stop_child(self) -> None:
        if self._child is not None:
            await self._child.stop()
        self._child = None
