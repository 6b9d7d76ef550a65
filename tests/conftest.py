"""What every test, unit or end-to-end, is checked for: that it leaves no asyncio task behind
(kopf's `_no_asyncio_pending_tasks`, in its tests' conftest). A forgotten task is a stream, a
watch or a heartbeat that nothing stops; `asyncio.run` would cancel it quietly.
"""

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
Tasks = set["asyncio.Task[Any]"]


def _pending() -> Tasks:
    """The unfinished tasks of every event loop, this thread's or another's: asyncio keeps them
    all in one weak set (`asyncio.all_tasks` answers for the running loop only)."""
    every = vars(asyncio.tasks)["_all_tasks"]
    return {task for task in list(every) if not task.done()}


def _forgotten(tasks: Tasks) -> Tasks:
    """Without the loop's own: the closing of an async generator left half-read (httpx's line
    iterators under a stream closed early), which the loop schedules when the generator is
    collected and finishes when it shuts down."""
    return {t for t in tasks if type(t.get_coro()).__name__ != "async_generator_athrow"}


@pytest.fixture(autouse=True)
def _no_asyncio_pending_tasks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fails the test if it left tasks pending in any loop, or if a coroutine that `asyncio.run`
    ran returned with tasks of its loop still pending."""
    before = _pending()
    left_by_run: Tasks = set()
    run = asyncio.run

    def checked_run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
        async def watched() -> T:
            try:
                return await main
            finally:
                left_by_run.update(asyncio.all_tasks() - {asyncio.current_task()})

        return run(watched(), debug=debug)

    monkeypatch.setattr(asyncio, "run", checked_run)
    yield
    left = _forgotten((_pending() - before) | left_by_run)
    if left:
        pytest.fail(f"asyncio tasks left pending: {sorted(map(repr, left))}")
