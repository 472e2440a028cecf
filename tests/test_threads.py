"""core.threads.in_thread: blocking work in the pool, in a copy of the caller's context, with the
thread's stale database connections closed around it; a cancelled caller does not stop it."""
import asyncio
import contextvars
import threading

import pytest

from core import threads
from core.threads import in_thread

asked = contextvars.ContextVar("asked", default=None)


async def test_the_call_runs_in_the_pool_with_the_callers_context_and_its_outcome():
    def work(a, *, b):
        asked.set("changed in the thread")  # the caller's own value stays
        return threading.current_thread().name, a + b, asked.get()

    token = asked.set("the caller's")
    try:
        name, total, _ = await in_thread(work)(1, b=2)
        assert asked.get() == "the caller's"
    finally:
        asked.reset(token)
    assert name.startswith("chat-io") and total == 3

    seen = await in_thread(lambda: asked.get())()
    assert seen is None

    token = asked.set("visible")
    try:
        assert await in_thread(lambda: asked.get())() == "visible"
    finally:
        asked.reset(token)

    def fails():
        raise LookupError("from the thread")

    with pytest.raises(LookupError, match="from the thread"):
        await in_thread(fails)()


async def test_stale_connections_are_closed_before_and_after_each_call(monkeypatch):
    calls = []
    monkeypatch.setattr(threads, "close_old_connections", lambda: calls.append("close"))
    await in_thread(lambda: calls.append("work"))()
    assert calls == ["close", "work", "close"]
    calls.clear()
    with pytest.raises(ZeroDivisionError):
        await in_thread(lambda: calls.append("work") or 1 / 0)()
    assert calls == ["close", "work", "close"]


async def test_a_cancelled_caller_does_not_stop_the_work_it_asked_for(monkeypatch):
    """Started or still queued behind others: blocking work runs to its end (a batch of sends
    commits whole even when the process is shutting down)."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(threads, "_pool", ThreadPoolExecutor(max_workers=1))
    started, release = threading.Event(), threading.Event()
    done = []

    def first():
        started.set()
        release.wait(5)
        done.append("first")

    running = asyncio.create_task(in_thread(first)())
    queued = asyncio.create_task(in_thread(lambda: done.append("queued"))())
    assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
    for caller in (running, queued):
        caller.cancel()
    for caller in (running, queued):
        with pytest.raises(asyncio.CancelledError):
            await caller
    release.set()
    threads._pool.shutdown(wait=True)
    assert done == ["first", "queued"]
