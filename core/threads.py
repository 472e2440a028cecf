"""The one thread pool for blocking work (ORM, message store, password hashing) called from the
event loop: WebSocket handshakes, sends and reads all use it.

channels' default (`database_sync_to_async`, thread-sensitive) funnels every caller of a process
through one thread, one after another, each waiting on its round trips; this pool runs up to
CHAT_WORKER_THREADS of them side by side. Each call closes its thread's stale database
connections around it, as channels does.

The hop itself is the event loop's own (`run_in_executor`), not asgiref's SyncToAsync: that one
serves thread-sensitive code and nested sync/async calls, which nothing here needs, and costs
several times as much per call (a tenth of a handshake's CPU went to its hops).
What this keeps of it: the call runs in a copy of the caller's context (context variables, such as
a collecting publish, see the same values), and a caller that is cancelled does not cancel a call
that has started or is queued: blocking work runs to its end, as it would have under asgiref.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import close_old_connections

_pool = ThreadPoolExecutor(max_workers=settings.CHAT_WORKER_THREADS, thread_name_prefix="chat-io")


def _run(func, args, kwargs):
    close_old_connections()
    try:
        return func(*args, **kwargs)
    finally:
        close_old_connections()


def in_thread(func):
    """`func` as a coroutine function that runs in the pool."""

    @functools.wraps(func)
    async def call(*args, **kwargs):
        context = contextvars.copy_context()
        future = asyncio.get_running_loop().run_in_executor(_pool, context.run, _run, func, args, kwargs)
        return await asyncio.shield(future)

    return call
