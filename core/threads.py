"""The one thread pool for blocking work (ORM, message store, password hashing) called from the
event loop: WebSocket handshakes, sends and reads all use it.

channels' default (`database_sync_to_async`, thread-sensitive) funnels every caller of a process
through one thread, one after another, each waiting on its round trips; this pool runs up to
CHAT_WORKER_THREADS of them side by side. Each call closes its thread's stale database
connections around it, as channels does.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from channels.db import database_sync_to_async
from django.conf import settings

_pool = ThreadPoolExecutor(max_workers=settings.CHAT_WORKER_THREADS, thread_name_prefix="chat-io")


def in_thread(func):
    """`func` as a coroutine function that runs in the pool."""
    return database_sync_to_async(func, thread_sensitive=False, executor=_pool)
