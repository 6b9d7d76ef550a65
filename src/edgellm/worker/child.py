"""A server the worker runs as a child process: started, waited for until it answers its health
check, and stopped with its whole process group. The vLLM backend runs `vllm serve` so, and a
split's leader the `edgellm worker` that loads the model across peers."""

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)


class ChildStartError(Exception):
    """The child exited, or was not healthy by the deadline; the message ends with its log."""


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open(errors="replace") as log:
            return "".join(deque(log, maxlen=lines)).rstrip()
    except OSError:
        return ""


class ChildServer:
    def __init__(
        self,
        name: str,
        health_url: str | None,
        log_path: Path,
        *,
        startup_timeout: float,
        stop_grace: float,
        quiet_grace: float = 60.0,
    ) -> None:
        """A child without `health_url` answers nothing (a headless vLLM rank): it counts as
        started once it has run `quiet_grace` seconds without exiting."""
        self.name = name
        self.health_url = health_url
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.quiet_grace = quiet_grace
        self.process: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        """Starts the child and returns once its health check answers 200."""
        if self.process is not None:
            raise RuntimeError(f"{self.name} is already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        logger.info("starting %s", " ".join(argv))
        try:
            # One file keeps stdout and stderr in order. Its own session, so that a kill
            # reaches every process it spawns (vLLM's engine and GPU workers).
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
            )
        except OSError as e:
            raise ChildStartError(f"cannot run {argv[0]!r}: {e}") from e
        finally:
            os.close(log)
        try:
            if self.health_url is None:
                await self._wait_running(self.process)
            else:
                await self._wait_healthy(self.process, self.health_url)
        except BaseException:
            await self.stop()
            raise

    async def _wait_running(self, process: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), self.quiet_grace)
        if process.returncode is not None:
            raise await self._exit_error(process)

    async def _exit_error(self, process: asyncio.subprocess.Process) -> ChildStartError:
        tail = await asyncio.to_thread(log_tail, self.log_path)
        return ChildStartError(
            f"{self.name} exited with code {process.returncode} while starting;"
            f" the end of {self.log_path}:\n{tail}"
        )

    async def _wait_healthy(self, process: asyncio.subprocess.Process, url: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        exited = asyncio.ensure_future(process.wait())
        try:
            async with httpx.AsyncClient(timeout=5.0) as http:
                while not exited.done():
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get(url)).status_code == 200:
                            return
                    if time.monotonic() > deadline:
                        tail = await asyncio.to_thread(log_tail, self.log_path)
                        raise ChildStartError(
                            f"{self.name} was not healthy at {url} after"
                            f" {self.startup_timeout:g} s; the end of {self.log_path}:\n{tail}"
                        )
                    await asyncio.wait({exited}, timeout=0.5)  # wakes at once if it exits
        finally:
            exited.cancel()
        raise await self._exit_error(process)

    async def stop(self) -> None:
        """Asks the child to shut down, and kills its whole session if it has not after a
        grace."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), self.stop_grace)
            except TimeoutError:
                logger.warning("%s did not stop in %g s: killing it", self.name, self.stop_grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
