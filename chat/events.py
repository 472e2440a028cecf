"""Realtime events: the only code that publishes to the channel layer (chat.fanout subscribes).

Every event that announces a change is published after the change commits, in one way: the
functions below hand it to `transaction.on_commit` (outside a transaction it goes at once), as
Zulip's send_event_on_commit does. A rolled-back change announces nothing. A caller on the event
loop runs its blocking work under `collecting()`, which keeps the events the work committed and
hands them back, to be published from the loop with `apublish_collected()`. Typing and presence
announce no stored change and are published directly from the loop.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction

from chat import metrics
from chat.selectors import change_frame
from chat.store import Change, Message
from core.batching import Batcher, per_loop

logger = logging.getLogger(__name__)

# A publish must not hold a send hostage: past this the message stays durable and clients
# recover it from the store.
PUBLISH_TIMEOUT_SECONDS = 1.0


def conversation_group(conversation_id: uuid.UUID | str) -> str:
    return f"conversation.{uuid.UUID(str(conversation_id)).hex}"


USER_GROUP_PREFIX = "user."


def user_group(user_id: uuid.UUID | str) -> str:
    """A user's own group: their joins and leaves, for their user streams."""
    return f"{USER_GROUP_PREFIX}{uuid.UUID(str(user_id)).hex}"


# Revocations of whole accounts (deactivation, password change) go to this one group, which a
# process subscribes once for all its sockets (chat.fanout routes each event to the process's
# sockets of that account), instead of to a group per user: every conversation socket would
# otherwise hold a Redis subscription of its own, for its user, made and dropped with each handshake.
ACCOUNTS_GROUP = "accounts"


async def retry_once(operation: Callable[[], Awaitable[None]]) -> None:
    """Run a channel-layer operation, once more on failure: after Redis restarts, each pooled
    connection fails once before it reconnects, and that must not cost a publish or a socket."""
    try:
        await operation()
    except asyncio.CancelledError:
        raise
    except Exception:
        await operation()


async def apublish(conversation_id: uuid.UUID, event: dict[str, Any]) -> bool:
    """Send one event to every connection of the conversation; False (counted, logged) on failure.
    The events a process's sockets publish at the same moment (a reconnect storm's presence
    announcements, typing) go out together, in one pipeline on the Redis layer."""
    try:
        return await _publish_batcher().submit((conversation_group(conversation_id), event))
    except Exception:  # waited too long for its batch, or no channel layer: counted like a failed publish
        metrics.message_published.labels(status="error").inc()
        logger.warning("publish of %s to conversation %s failed", event.get("type"), conversation_id, exc_info=True)
        return False


async def _apublish_to(group: str, event: dict[str, Any]) -> bool:
    # The group travels with the event: each process's fan-out routes by it (chat.fanout).
    return await _publish_counted(
        lambda: get_channel_layer().group_send(group, {**event, "group": group}), 1, f"{event.get('type')} to {group}"
    )


async def _publish_counted(operation: Callable[[], Awaitable[None]], count: int, what: str) -> bool:
    """Run a publish of `count` events, bounded in time and retried once; each event counted.
    False (logged) on failure."""
    started = time.perf_counter()
    try:
        await asyncio.wait_for(retry_once(operation), PUBLISH_TIMEOUT_SECONDS)
    except Exception:
        metrics.message_published.labels(status="error").inc(count)
        if settings.REDIS_URL:
            metrics.redis_publish_error.inc(count)
        logger.warning("publish of %s failed", what, exc_info=True)
        return False
    metrics.message_published.labels(status="success").inc(count)
    if settings.REDIS_URL:
        metrics.redis_publish_success.inc(count)
    elapsed = time.perf_counter() - started
    for _ in range(count):  # what each event waited for: observed once per event
        metrics.message_delivery_duration.labels(step="publish").observe(elapsed)
    return True


def _publish_to(group: str, event: dict[str, Any]) -> bool:
    """_apublish_to for code off the event loop (a sync view, the admin, a management command)."""
    published = async_to_sync(_apublish_to)(group, event)
    if not published and event.get("type") in RETRIED_EVENT_TYPES:
        threading.Thread(target=_retry_in_thread, args=(group, event), name="chat-publish-retry", daemon=True).start()
    return published


# A lost revocation leaves a socket reading a conversation it may no longer read, so its publish is
# retried, in the background (the caller never waits), after each of these delays; past them the
# periodic membership re-check (chat.recheck, CHAT_MEMBERSHIP_RECHECK) still closes the socket.
RETRIED_EVENT_TYPES = frozenset({"membership.revoked", "conversation.left"})
RETRY_DELAYS_SECONDS = (0.25, 0.5, 1.0, 2.0, 4.0)
_retry_tasks: set[asyncio.Task] = set()


def _retry_in_thread(group: str, event: dict[str, Any]) -> None:
    for delay in RETRY_DELAYS_SECONDS:
        time.sleep(delay)
        if async_to_sync(_apublish_to)(group, event):
            return
    logger.error("publish of %s to %s failed after %d retries", event.get("type"), group, len(RETRY_DELAYS_SECONDS))


async def _aretry(group: str, event: dict[str, Any]) -> None:
    for delay in RETRY_DELAYS_SECONDS:
        await asyncio.sleep(delay)
        if await _apublish_to(group, event):
            return
    logger.error("publish of %s to %s failed after %d retries", event.get("type"), group, len(RETRY_DELAYS_SECONDS))

# Set by `collecting()` for the blocking work of one event-loop caller: committed events land here.
_collected: contextvars.ContextVar[list[tuple[str, dict[str, Any]]] | None] = contextvars.ContextVar(
    "chat_collected_events", default=None
)


def send_event_on_commit(group: str, event: dict[str, Any]) -> None:
    """Publish `event` to `group` once the current transaction commits."""
    collected = _collected.get()
    if collected is not None:
        transaction.on_commit(lambda: collected.append((group, event)))
    else:
        transaction.on_commit(lambda: _publish_to(group, event))


def collecting(func: Callable[..., Any]) -> Callable[..., tuple[Any, list[tuple[str, dict[str, Any]]]]]:
    """`func` returning (its result, the events it committed) instead of publishing them; for
    blocking work run from the event loop, whose caller then awaits `apublish_collected`."""

    def run(*args: Any, **kwargs: Any):
        events: list[tuple[str, dict[str, Any]]] = []
        token = _collected.set(events)
        try:
            return func(*args, **kwargs), events
        finally:
            _collected.reset(token)

    return run


async def apublish_collected(events: list[tuple[str, dict[str, Any]]]) -> None:
    """Publish what one piece of work committed, each group's events in order."""
    for (group, event), published in zip(events, await _apublish_each(events)):
        if not published and event.get("type") in RETRIED_EVENT_TYPES:
            task = asyncio.get_running_loop().create_task(_aretry(group, event))
            _retry_tasks.add(task)
            task.add_done_callback(_retry_tasks.discard)


async def _apublish_each(events: list[tuple[str, dict[str, Any]]]) -> list[bool]:
    """Publish (group, event) pairs, each group's in order; whether each went out. On the Redis
    layer they go in one pipeline (one round trip); otherwise one by one."""
    layer = get_channel_layer()
    if len(events) > 1 and hasattr(layer, "group_send_many"):
        return [await _apublish_many(layer, events)] * len(events)
    return [await _apublish_to(group, event) for group, event in events]


# An event waits for its batch at most as long as a publish may take: typing and presence are
# live-only, and late is as good as lost.
_publish_batcher = per_loop(lambda: Batcher(_apublish_each, max_batch=256, max_wait=PUBLISH_TIMEOUT_SECONDS))


async def _apublish_many(layer, events: list[tuple[str, dict[str, Any]]]) -> bool:
    """_apublish_to for many events in one call of the layer."""
    items = [(group, {**event, "group": group}) for group, event in events]
    return await _publish_counted(lambda: layer.group_send_many(items), len(events), f"{len(events)} events")


# Events carry messages as frames do (Message.inline): large content goes neither through the
# channel layer nor out on a socket.
def message_new(message: Message) -> None:
    send_event_on_commit(
        conversation_group(message.conversation_id), {"type": "message.new", "message": message.inline().as_dict()}
    )


# Changes (SPEC 4.1) carry their change number: sockets let them out in change order.
def message_updated(message: Message, change: int) -> None:
    send_event_on_commit(
        conversation_group(message.conversation_id),
        {"type": "message.updated", "conversation_id": str(message.conversation_id), "message": message.inline().as_dict(), "change": change},
    )


def message_deleted(conversation_id: uuid.UUID, seq: int, change: int) -> None:
    send_event_on_commit(
        conversation_group(conversation_id),
        {"type": "message.deleted", "conversation_id": str(conversation_id), "seq": seq, "change": change},
    )


def reaction_changed(change: Change) -> None:
    """reaction.added / reaction.removed, in the very shape the change log replays them."""
    send_event_on_commit(conversation_group(change.conversation_id), change_frame(change.conversation_id, change, None))


def read_marker(conversation_id: uuid.UUID, user_id: uuid.UUID, seq: int) -> None:
    send_event_on_commit(conversation_group(conversation_id), {"type": "read", "user_id": str(user_id), "seq": seq})


async def typing(conversation_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    return await apublish(conversation_id, {"type": "typing", "user_id": str(user_id)})


async def presence(conversation_id: uuid.UUID, user_id: uuid.UUID, *, online: bool) -> bool:
    return await apublish(conversation_id, {"type": "presence", "user_id": str(user_id), "online": online})


def membership_revoked(conversation_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """Tell the user's connections to this conversation to close (4403)."""
    send_event_on_commit(conversation_group(conversation_id), {"type": "membership.revoked", "user_id": str(user_id)})


def user_sockets_revoked(user_id: uuid.UUID) -> None:
    """Tell all of the user's connections, on every conversation, to close (4403)."""
    send_event_on_commit(ACCOUNTS_GROUP, {"type": "membership.revoked", "user_id": str(user_id)})


# Membership, live on the user stream (SPEC section 5). Joins and leaves go to the person's own
# group, with where the conversation stood when they happened (read under the conversation's row
# lock, so sends are ordered around them): a stream starts a joined conversation after last_seq and
# last_change, and delivers a left one up to them before it says conversation.left.
def conversation_joined(user_id: uuid.UUID, conversation: dict[str, Any], last_seq: int, last_change: int) -> None:
    send_event_on_commit(
        user_group(user_id),
        {
            "type": "conversation.joined",
            "conversation_id": conversation["id"],
            "conversation": conversation,
            "last_seq": last_seq,
            "last_change": last_change,
        },
    )


def conversation_left(user_id: uuid.UUID, conversation_id: uuid.UUID, reason: str, last_seq: int, last_change: int) -> None:
    send_event_on_commit(
        user_group(user_id),
        {
            "type": "conversation.left",
            "conversation_id": str(conversation_id),
            "reason": reason,
            "last_seq": last_seq,
            "last_change": last_change,
        },
    )


def conversation_updated(conversation: dict[str, Any]) -> None:
    """The conversation's own fields changed (its title): one event to its group, for the streams."""
    send_event_on_commit(
        conversation_group(conversation["id"]),
        {"type": "conversation.updated", "conversation_id": conversation["id"], "conversation": conversation},
    )
