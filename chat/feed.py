"""One conversation as one socket sees it (SPEC section 5), for both kinds of connection: the
conversation socket holds one feed, the user stream one per conversation of the user.

A feed lets each message out exactly once in seq order and each change (edit, delete, reaction)
exactly once in change order, through two chat.delivery.SeqGate: what the channel layer loses or
reorders is read from the store. It replays what a client missed (after a seq and a change), turns
the conversation's events into frames, and is told by chat.recheck where the conversation stands.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from django.conf import settings

from chat import metrics
from chat.delivery import SeqGate
from chat.frames import frame_too_large, member_frame, message_new_frame, shared_frame
from chat.selectors import change_frame, change_range, message_range
from core.threads import in_thread

logger = logging.getLogger(__name__)

# (frame, its encoded text or None) -> None: the socket's one way to write a frame.
SendFrame = Callable[[dict, "str | None"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a client stands in a conversation: the last seq and last change it has (None: it
    asks for nothing before now)."""

    seq: int | None = None
    change: int | None = None


def parse_position(value: object) -> int | None:
    """A seq or change number from a client (query string or JSON): a non-negative integer below
    2**62; None when it is not one."""
    if isinstance(value, str):
        return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62:
        return value
    return None


class ConversationFeed:
    def __init__(
        self,
        *,
        conversation_id: uuid.UUID,
        user_id: uuid.UUID,
        send: SendFrame,
        emit_message: Callable[[dict], Awaitable[None]],
        last_seq: int,
        last_change: int,
        cursor: Cursor = Cursor(),
    ) -> None:
        self.conversation_id = conversation_id
        self._conversation = str(conversation_id)
        self._user = str(user_id)
        self._send = send
        self.last_seq, self.last_change = last_seq, last_change
        self.cursor = cursor
        # Past CHAT_MAX_REPLAY missing (or a cursor from the future) nothing is replayed: the
        # client pages REST instead, and live delivery starts from where the conversation stands.
        self.recovered = all(
            position is None or 0 <= latest - position <= settings.CHAT_MAX_REPLAY
            for position, latest in ((cursor.seq, last_seq), (cursor.change, last_change))
        )
        replay = self.recovered
        self._emit_to_socket = emit_message
        # Changes of messages not let out yet, in change order: each goes out right after its
        # message (see _emit_change).
        # (A tuple while empty, as it nearly always is: an empty deque costs 0.7 KiB per socket
        # and conversation.)
        self._deferred: deque[tuple[int, dict]] | tuple = ()
        self.messages = SeqGate(
            emit=self._emit_message,
            fetch=self._read_messages,
            next_seq=cursor.seq + 1 if replay and cursor.seq is not None else last_seq + 1,
            max_fetch=settings.CHAT_MAX_REPLAY,
            name=conversation_id,
        )
        self.changes = SeqGate(
            emit=self._emit_change,
            fetch=self._read_changes,
            next_seq=cursor.change + 1 if replay and cursor.change is not None else last_change + 1,
            max_fetch=settings.CHAT_MAX_REPLAY,
            name=conversation_id,
            key="change",
        )
        self.catch_up_task: asyncio.Task | None = None
        # Held while a resume replays (chat.consumers): the conversation's live events wait.
        self.busy = asyncio.Lock()

    # --- replay ---------------------------------------------------------------------------------
    async def replay(self) -> None:
        """Let out what the cursor asked for, up to where the conversation stood when the feed
        was made: messages first, then changes (a change names a message the client then has)."""
        if not self.recovered:
            return
        position, upto = self.cursor.seq, self.last_seq
        while position is not None and position < upto:
            # Page by page: a page is bounded in bytes, so a replay holds a few MiB at a time.
            messages = await self._read_messages(position, upto + 1, upto - position)
            if not messages:
                break
            metrics.replayed_messages.inc(len(messages))
            for message in messages:
                await self.messages.deliver(message)
            position = messages[-1]["seq"]
        position, upto = self.cursor.change, self.last_change
        while position is not None and position < upto:
            frames = await self._read_changes(position, upto + 1, upto - position)
            if not frames:
                break
            for frame in frames:
                await self.changes.deliver(frame)
            position = frames[-1]["change"]

    async def _read_messages(self, after_seq: int, before_seq: int, limit: int) -> list[dict]:
        """The stored messages strictly between the two seqs, ascending (replay and gap fill)."""
        page = await in_thread(message_range)(
            conversation_id=self.conversation_id, after_seq=after_seq, before_seq=before_seq, limit=limit
        )
        return [message.as_dict() for message in page.messages]  # already inline: see chat.selectors

    async def _read_changes(self, after_change: int, before_change: int, limit: int) -> list[dict]:
        """The logged changes strictly between the two numbers, as their frames (replay and gap fill)."""
        page = await in_thread(change_range)(
            conversation_id=self.conversation_id, after_change=after_change, before_change=before_change, limit=limit
        )
        return [change_frame(self.conversation_id, change, message) for change, message in page.changes]

    # --- events -----------------------------------------------------------------------------------
    def missing(self, cursor: Cursor) -> int:
        """How many messages and changes a resume from `cursor` would replay at most."""
        return sum(
            max(gate.next_seq - 1 - position, 0)
            for gate, position in ((self.messages, cursor.seq), (self.changes, cursor.change))
            if position is not None
        )

    async def resume(self, cursor: Cursor, last_seq: int, last_change: int) -> bool:
        """A resume frame's cursor for this conversation (`last_seq`, `last_change`: committed, read
        for the resume): let out the messages after cursor.seq and the changes after cursor.change
        before any further live event of the conversation. False, and nothing let out, when it
        cannot be honoured: more than CHAT_MAX_REPLAY missing, or a cursor from the future."""
        async with self.busy:
            plans = []
            for gate, position, committed in ((self.messages, cursor.seq, last_seq), (self.changes, cursor.change, last_change)):
                if position is None:
                    continue
                if position > committed or gate.next_seq - 1 - position > settings.CHAT_MAX_REPLAY:
                    return False
                plans.append((gate, position))
            for gate, position in plans:
                if position >= gate.next_seq:
                    await gate.skip_to(position + 1)  # the client has these from an earlier connection
                    continue
                # Below what this connection has let out: the client asks again; send them again.
                upto = gate.next_seq
                while position < upto - 1:
                    if gate is self.messages:
                        items = await self._read_messages(position, upto, upto - 1 - position)
                        metrics.replayed_messages.inc(len(items))
                        for item in items:
                            await self._emit_to_socket(item)
                        position = items[-1]["seq"] if items else upto
                    else:
                        items = await self._read_changes(position, upto, upto - 1 - position)
                        for item in items:
                            await self._emit_change(item)
                        position = items[-1]["change"] if items else upto
            return True

    def frame_now(self, event: dict) -> str | None:
        """The frame of `event` as text if it may go out at once, ahead of the full path (the
        socket's fast path, chat.consumers.ChatSocket.feed): the next message in seq order with no
        change waiting for it, or a typing, presence or read event; "" when the event is nothing
        for this socket. None: it must go through `handle`."""
        if self.busy.locked() or self._deferred:
            return None
        kind = event["type"]
        if kind == "message.new":
            message = event["message"]
            text = message_new_frame(message)
            if frame_too_large(text) or not self.messages.take_next(message["seq"]):
                return None
            return text
        if kind in ("typing", "presence", "read"):
            if kind != "read" and event["user_id"] == self._user:
                return ""  # your own typing and presence are not news to you
            return shared_frame(event, self._member_frame)
        return None

    def _member_frame(self, event: dict) -> dict:
        return member_frame(event, self._conversation)

    async def handle(self, event: dict) -> None:
        """One event of the conversation's group, in the order the process received it."""
        async with self.busy:
            await self._handle(event)

    async def _handle(self, event: dict) -> None:
        kind = event["type"]
        if kind == "message.new":
            started = time.perf_counter()
            await self.messages.deliver(event["message"])
            metrics.message_delivery_duration.labels(step="deliver").observe(time.perf_counter() - started)
        elif "change" in event:  # message.updated, message.deleted, reaction.*
            await self.changes.deliver({key: value for key, value in event.items() if key != "group"})
        elif kind in ("typing", "presence", "read"):
            if kind == "read" or event["user_id"] != self._user:
                await self._send(self._member_frame(event), None)

    async def _emit_message(self, message: dict) -> None:
        """The messages gate lets `message` out: then the changes that waited for it."""
        await self._emit_to_socket(message)
        while self._deferred and self._deferred[0][0] <= message["seq"]:
            await self._send(self._deferred.popleft()[1], None)
        if not self._deferred:
            self._deferred = ()

    async def _emit_change(self, frame: dict) -> None:
        """A change goes out after the message it names, so a client never sees a change of a
        message it does not have, nor the message unchanged after its change. If that message is
        not out yet, the change is folded into it where it is held, waits for it (and so do the
        changes after it, to keep change order), and the message is read from the store now,
        which has it as it is now; the change then follows it at once."""
        message = frame.get("message")
        seq = message["seq"] if message is not None else frame["seq"]
        if not self._deferred and seq < self.messages.next_seq:
            return await self._send(frame, None)
        if frame["type"] == "message.updated":
            await self.messages.update(message)
        elif frame["type"] == "message.deleted":
            await self.messages.delete(seq)
        if not self._deferred:
            self._deferred = deque()
        self._deferred.append((seq, frame))
        await self.messages.catch_up(seq)

    def catch_up(self, last_seq: int, last_change: int) -> None:
        """The conversation has committed up to these (chat.recheck, the settle look after a
        subscription): read what this socket lacks from the store, in the background."""
        running = self.catch_up_task is not None and not self.catch_up_task.done()
        if not running and (self.messages.next_seq <= last_seq or self.changes.next_seq <= last_change):
            self.catch_up_task = asyncio.create_task(self.catch_up_now(last_seq, last_change))

    async def catch_up_now(self, last_seq: int, last_change: int) -> None:
        # Not while a resume replays: what it reads would go out before the replayed past.
        async with self.busy:
            await self.messages.catch_up(last_seq)
            await self.changes.catch_up(last_change)

    def close(self) -> None:
        self._deferred = ()
        self.messages.close()
        self.changes.close()
        if self.catch_up_task is not None and not self.catch_up_task.done():
            self.catch_up_task.cancel()
