"""The WebSocket endpoint: handshake authorization, catch-up, in-order delivery, client frames.

Per connection, messages go out exactly once and in strictly increasing seq through a
chat.delivery.SeqGate: duplicates (replay overlapping live delivery) are dropped, an early arrival
waits briefly for the missing seqs, which are then read from the store (a publish may be lost or
overtaken; the store has every message).
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from urllib.parse import parse_qs

import orjson
from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from chat import events, metrics, overload, recheck
from chat.access import access_conversation
from chat.delivery import SeqGate
from chat.feed import ConversationFeed, Cursor, parse_position
from chat.fanout import get_fanout
from core.errors import AccessDenied, ChatError, ValidationFailed
from core.jsonsafe import loads_bounded
from chat.presence import get_presence
from core.threads import in_thread
from chat.services.conversations import read_marker_set
from chat.services.send import SendRequest, amessage_send
from chat.selectors import conversation_last_seq
from chat.store import utf8_length

logger = logging.getLogger(__name__)

MAX_INBOUND_FRAME_BYTES = 1024 * 1024
TYPING_MIN_INTERVAL_SECONDS = 1.0
# How long a client may sit on more than CHAT_MAX_OUTBOUND_BYTES unread before it is closed (4008).
SLOW_CLIENT_GRACE_SECONDS = 2.0

# How long after the handshake a socket looks at the store once more (see connect).
SUBSCRIBE_SETTLE_SECONDS = 1.0

CLOSE_MEMBERSHIP_REVOKED = 4403
CLOSE_TOO_SLOW = 4008
# 1013 (Try Again Later) is what this means, but daphne's WebSocket layer (autobahn) lets a server
# close only with 1000 or 3000-4999: 4013 mirrors it in the application range.
CLOSE_TRY_AGAIN_LATER = 4013

# Per-process connection accounting for CHAT_MAX_CONNECTIONS(_PER_USER).
_open_connections: Counter = Counter()


def socket_backlog_probe(send) -> Callable[[], int] | None:
    """How many bytes the server holds for this client that the client has not taken yet.

    daphne applies no backpressure: every frame goes straight into the connection's Twisted
    transport buffer, which grows without bound for a client that stops reading. daphne hands the
    application `partial(server.handle_reply, protocol)` as `send` (kept in the scope by
    chat.ws_auth.keep_server_send, before any middleware wraps it); the protocol's transport keeps
    the buffer. Under another server (or the in-process test communicator) there is no probe and
    the outbound bound is not enforced.
    """
    protocol = send.args[0] if isinstance(send, functools.partial) and send.args else None
    transport = getattr(protocol, "transport", None)
    if transport is None or not all(hasattr(transport, a) for a in ("dataBuffer", "offset", "_tempDataLen")):
        return None
    return lambda: len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def encode_frame(frame: dict) -> str:
    """A frame as JSON text that always has a UTF-8 encoding, whatever client input it echoes."""
    try:
        return orjson.dumps(frame).decode()
    except TypeError:
        # orjson refuses integers beyond 64 bits (client metadata) and unpaired surrogates (a
        # client's "\\ud800" escape, echoed in client_message_id): the standard encoder takes both,
        # and with ensure_ascii it writes a surrogate as its escape, so daphne can encode the text.
        return json.dumps(frame, separators=(",", ":"), ensure_ascii=True)


# The message.new frames this process encoded last. The fan-out hands one message dict to every
# local socket of its conversation, so the frame is encoded once per process, not once per socket
# (identity, not equality, is checked: a patched copy, an edit or a tombstone is a new dict).
_MESSAGE_FRAMES_KEPT = 256
_message_frames: OrderedDict[int, tuple[dict, str]] = OrderedDict()


def message_new_frame(message: dict) -> str:
    kept = _message_frames.get(id(message))
    if kept is not None and kept[0] is message:
        return kept[1]
    text = encode_frame({"type": "message.new", "conversation_id": message["conversation_id"], "message": message})
    _message_frames[id(message)] = (message, text)
    if len(_message_frames) > _MESSAGE_FRAMES_KEPT:
        _message_frames.popitem(last=False)
    return text


def frame_too_large(text: str) -> bool:
    """Whether a text frame's UTF-8 encoding is over the transport's cap (CHAT_MAX_FRAME_BYTES)."""
    cap = settings.CHAT_MAX_FRAME_BYTES
    return len(text) > cap or (len(text) * 4 > cap and utf8_length(text) > cap)


def _query_param(scope, name: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin1")).get(name)
    return values[0] if values else None


class ChatConsumer(AsyncWebsocketConsumer):
    # No channel per socket: the process's fan-out (chat.fanout) receives each event once and
    # feeds it to this socket's inbox, drained by a task of its own while it holds anything.
    channel_layer_alias = None

    user = None
    conversation_id: uuid.UUID | None = None
    holds_slot = False
    counted = False
    presence_joined = False
    presence_task: asyncio.Task | None = None
    settle_task: asyncio.Task | None = None
    closing = False
    feed_of: ConversationFeed | None = None  # the conversation, from the end of the handshake on
    gate: SeqGate | None = None  # its messages' gate
    backlog = 0  # this connection's share of chat_client_send_channel_length

    # --- handshake -------------------------------------------------------------------------
    async def connect(self) -> None:
        self.user = self.scope.get("user")
        self.cleaned_up = False
        self.subscribed: list[str] = []
        # This connection's name in presence entries (there is no per-socket channel name).
        self.connection_id = uuid.uuid4().hex
        # Events wait here; a drain task exists only while there are some, so an idle socket
        # holds no task (thousands of idle sockets per process).
        self.inbox: deque[dict] = deque()
        self.inbox_task: asyncio.Task | None = None
        self.inbox_open = False  # until the handshake is done; and closed for good after a failure
        self.last_typing = 0.0
        self.backlog_probe = socket_backlog_probe(self.scope.get("server_send"))

        after_seq, after_change = _query_param(self.scope, "after_seq"), _query_param(self.scope, "after_change")
        if self.user is None or not self.user.is_authenticated:
            return await self._refuse("unauthenticated")
        cursor = Cursor(seq=parse_position(after_seq), change=parse_position(after_change))
        if (after_seq is not None and cursor.seq is None) or (after_change is not None and cursor.change is None):
            return await self._refuse("bad after_seq or after_change")
        if not self._reserve_slot():
            return await self._refuse("connection limit")
        try:
            conversation, _ = await in_thread(access_conversation)(
                user=self.user, conversation_id=_query_param(self.scope, "conversation_id")
            )
        except AccessDenied:
            return await self._refuse("not a participant")
        self.conversation_id = conversation.id

        # Subscribe first, then read where the conversation stands: every later message is then
        # either already in the store or on its way to this socket's inbox. The user's own group
        # carries events about the person, such as deactivation.
        groups = [events.conversation_group(conversation.id), events.user_group(self.user.pk)]
        try:
            fanout = get_fanout()
            for group in groups:
                await fanout.subscribe(group, self)
                self.subscribed.append(group)
        except Exception:
            logger.warning("websocket: channel layer unavailable, closing with %d", CLOSE_TRY_AGAIN_LATER, exc_info=True)
            await self._unsubscribe()
            self._release_slot()
            await self.accept()
            await self._error("unavailable", "Realtime delivery is unavailable; reconnect with after_seq shortly.")
            return await self.close(code=CLOSE_TRY_AGAIN_LATER)
        metrics.websocket_connections.inc()
        self.counted = True
        # Authorize again now that revocations reach this socket: a ban or removal committed
        # between the first check and the subscription was published where we could not hear it.
        # This read is also where the conversation stands (last_seq).
        try:
            conversation, participant = await in_thread(access_conversation)(user=self.user, conversation_id=conversation.id)
        except AccessDenied:
            await self._cleanup()
            return await self._refuse("revoked during the handshake")
        # And again every CHAT_MEMBERSHIP_RECHECK seconds, for revocations that announce nothing.
        recheck.watch(self, participant.pk)
        self.feed_of = ConversationFeed(
            conversation_id=conversation.id,
            user_id=self.user.pk,
            send=self._send_json,
            # Looked up on each call, not bound now: tests replace _emit on a connected socket.
            emit_message=lambda message: self._emit(message),
            last_seq=conversation.last_seq,
            last_change=conversation.last_change,
            cursor=cursor,
        )
        self.gate = self.feed_of.messages

        overload.loop_lag.start()
        await self.accept()
        await self._send_json(
            {
                "type": "ready",
                "conversation_id": str(conversation.id),
                "user_id": str(self.user.pk),
                "last_seq": conversation.last_seq,
                "last_change": conversation.last_change,
                "recovered": self.feed_of.recovered,
            }
        )
        await self.feed_of.replay()
        # Live events waited in the inbox since the subscription; they go out after the ready
        # frame and the replay (the gate drops what the replay already delivered).
        self.inbox_open = True
        self._start_draining()
        # Presence is best effort and must not hold up the handshake: when thousands of clients
        # reconnect at once (a server restart), their joins queue for Redis connections, and a
        # handshake that waited for its join would time out and come back as one more.
        self.presence_task = asyncio.create_task(self._presence_join())
        # A new subscription takes effect when Redis has processed it, which channels-redis does
        # not wait for: a message published in between, and committed after the read above, would
        # only be revealed by a later message. One look at the store once the subscription is
        # surely live closes that window (the periodic re-check is the backstop).
        self.settle_task = asyncio.create_task(self._catch_up_after(SUBSCRIBE_SETTLE_SECONDS))

    def _reserve_slot(self) -> bool:
        if (
            _open_connections["*"] >= settings.CHAT_MAX_CONNECTIONS
            or _open_connections[self.user.pk] >= settings.CHAT_MAX_CONNECTIONS_PER_USER
        ):
            return False
        _open_connections["*"] += 1
        _open_connections[self.user.pk] += 1
        self.holds_slot = True
        return True

    # --- presence ------------------------------------------------------------------------------
    # Best effort: a presence failure (Redis down) is logged and never costs the connection.
    async def _presence_join(self) -> None:
        presence = get_presence()
        self.presence_joined = True  # before the call: a failed join is still left on disconnect
        try:
            if await presence.join(self.conversation_id, self.user.pk, self.connection_id):
                await events.presence(self.conversation_id, self.user.pk, online=True)
            for user_id in await presence.online(self.conversation_id):
                if user_id != self.user.pk:
                    await self._send_json(
                        {"type": "presence", "conversation_id": str(self.conversation_id), "user_id": str(user_id), "online": True}
                    )
        except Exception:
            logger.warning("presence: join failed", exc_info=True)

    async def _presence_leave(self) -> None:
        if not self.presence_joined:
            return
        self.presence_joined = False
        try:
            if await get_presence().leave(self.conversation_id, self.user.pk, self.connection_id):
                await events.presence(self.conversation_id, self.user.pk, online=False)
        except Exception:
            logger.warning("presence: leave failed", exc_info=True)

    async def _unsubscribe(self) -> None:
        fanout = get_fanout()
        while self.subscribed:
            await fanout.unsubscribe(self.subscribed.pop(), self)

    def feed(self, event: dict) -> None:
        """An event of one of this socket's groups, from the process's fan-out."""
        self.inbox.append(event)
        self._start_draining()

    def _start_draining(self) -> None:
        if self.inbox_open and self.inbox and self.inbox_task is None:
            self.inbox_task = asyncio.create_task(self._drain_inbox())

    async def _drain_inbox(self) -> None:
        """Handle this socket's events one at a time, in the order the process received them."""
        try:
            while self.inbox and self.inbox_open:
                try:
                    await self.dispatch(self.inbox.popleft())
                except Exception:
                    # Counted and logged by the handler; the socket cannot be trusted to be in
                    # order any more: close it (the client resumes with after_seq, loses nothing).
                    self.inbox_open = False
                    self.inbox.clear()
                    await self.close(code=1011)
        finally:
            self.inbox_task = None

    def _release_slot(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            _open_connections["*"] -= 1
            _open_connections[self.user.pk] -= 1
            if _open_connections[self.user.pk] <= 0:
                del _open_connections[self.user.pk]
            if _open_connections["*"] <= 0:
                del _open_connections["*"]

    async def _refuse(self, reason: str) -> None:
        self._release_slot()
        metrics.websocket_connection_unauthorized.inc()
        logger.info("websocket refused: %s", reason)
        await self.close()  # before accept(): daphne answers the handshake with HTTP 403

    async def dispatch(self, message: dict) -> None:
        # channels' AsyncConsumer.dispatch first closes stale database connections through
        # sync_to_async: a hop to its one thread-sensitive thread for every event of every socket,
        # so under fan-out each process's deliveries queued one by one behind that thread. This
        # consumer never uses the database on the event loop; its blocking work runs through
        # in_thread, which cleans up its own thread's connections around each call.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def __call__(self, scope, receive, send):
        # channels runs disconnect() only for a clean websocket.disconnect; a consumer that dies
        # of an exception (or is cancelled at shutdown) must release its slot, groups and presence
        # all the same.
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()

    async def disconnect(self, code: int) -> None:
        await self._cleanup()

    async def _cleanup(self) -> None:
        """Release everything this connection holds; safe to run more than once."""
        if getattr(self, "cleaned_up", True):
            return
        self.cleaned_up = True
        recheck.unwatch(self)
        for task in (self.presence_task, self.settle_task):
            if task is not None and not task.done():
                task.cancel()
        await self._presence_leave()
        metrics.client_send_channel_length.dec(self.backlog)
        self.backlog = 0
        if self.feed_of is not None:
            self.feed_of.close()
        await self._unsubscribe()
        self.inbox_open = False
        self.inbox.clear()
        if self.inbox_task is not None and self.inbox_task is not asyncio.current_task():
            self.inbox_task.cancel()
        if self.counted:
            metrics.websocket_connections.dec()
            self.counted = False
        self._release_slot()

    # --- outbound: in order, exactly once ------------------------------------------------------
    async def _send_json(self, frame: dict, text: str | None = None) -> None:
        """Write one frame (`text`: the frame already encoded). A frame that cannot go out (over
        the transport's cap, or the write fails) costs that frame, never the connection."""
        if self.closing:
            metrics.client_message_dropped.inc()
            return
        if self.backlog_probe is not None and not await self._wait_for_client():
            # The client stopped reading. Close it rather than buffer without bound; it resumes
            # with after_seq and loses nothing.
            logger.warning("websocket: %d bytes unread by %s, closing 4008", self.backlog, self.user)
            metrics.client_message_dropped.inc()
            self.closing = True
            return await self.close(code=CLOSE_TOO_SLOW)
        if text is None:
            text = encode_frame(frame)
        if frame_too_large(text):
            # daphne would fail the whole connection (1011) on it. Message content over the inline
            # limit never gets here (Message.inline); this is the guard for everything else.
            metrics.client_message_dropped.inc()
            metrics.frame_too_large.inc()
            logger.error("websocket: %s frame of %d characters over the frame cap, not sent", frame.get("type"), len(text))
            dropped = {"type": frame.get("type")}
            if isinstance(frame.get("message"), dict):
                dropped["seq"] = frame["message"].get("seq")
            text = encode_frame({
                "type": "error",
                "code": "unavailable",
                "detail": "A frame over the transport's size limit was not sent; read it over REST.",
                "dropped": dropped,
            })
        try:
            await self.send(text_data=text)
        except Exception:
            metrics.client_message_dropped.inc()
            logger.exception("websocket: writing a %s frame failed", frame.get("type"))

    async def _wait_for_client(self) -> bool:
        """Backpressure: hold this connection's output while the client has more than
        CHAT_MAX_OUTBOUND_BYTES unread; False if it does not catch up within the grace period."""
        deadline = time.monotonic() + SLOW_CLIENT_GRACE_SECONDS
        while True:
            backlog = self.backlog_probe()
            metrics.client_send_channel_length.inc(backlog - self.backlog)
            self.backlog = backlog
            if backlog <= settings.CHAT_MAX_OUTBOUND_BYTES:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)

    async def _emit(self, message: dict) -> None:
        frame = {"type": "message.new", "conversation_id": message["conversation_id"], "message": message}
        await self._send_json(frame, message_new_frame(message))

    # --- channel-layer events ----------------------------------------------------------------
    async def conversation_event(self, event: dict) -> None:
        try:
            await self.feed_of.handle(event)
        except Exception:
            metrics.broadcast_panic.inc()
            logger.exception("delivery failed on conversation %s", self.conversation_id)
            raise

    message_new = message_updated = message_deleted = reaction_added = reaction_removed = conversation_event
    typing = presence = read = conversation_event

    async def membership_revoked(self, event: dict) -> None:
        """Removed or banned from this conversation, or deactivated (then sent to the user's group)."""
        if event["user_id"] == str(self.user.pk):
            await self.revoke()

    def catch_up(self, last_seq: int) -> None:
        """chat.recheck: the conversation has committed up to last_seq."""
        if self.feed_of is not None and not self.closing:
            self.feed_of.catch_up(last_seq)

    async def _catch_up_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            last_seq = await in_thread(conversation_last_seq)(conversation_id=self.conversation_id)
        except Exception:
            logger.warning("websocket: catch-up read failed", exc_info=True)
            return
        self.catch_up(last_seq)

    async def revoke(self) -> None:
        """Close with 4403: the event above, or chat.recheck finding the access gone."""
        if self.closing:
            return
        self.closing = True
        await self.close(code=CLOSE_MEMBERSHIP_REVOKED)

    # --- inbound frames ------------------------------------------------------------------------
    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            return await self._error("bad_request", "Frames must be JSON text.")
        if len(text_data) > MAX_INBOUND_FRAME_BYTES or (
            len(text_data) * 4 > MAX_INBOUND_FRAME_BYTES and len(text_data.encode()) > MAX_INBOUND_FRAME_BYTES
        ):
            return await self._error("bad_request", "Frames are limited to 1 MiB; send large content over REST.")
        try:
            frame = loads_bounded(text_data)  # nesting over 32 is a ValueError too, not a RecursionError
        except ValueError:
            return await self._error("bad_request", "Frames must be valid JSON.")
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return await self._error("bad_request", 'Frames must be JSON objects with a string "type".')
        handler = {
            "message.send": self._on_message_send,
            "typing": self._on_typing,
            "read": self._on_read,
            "ping": self._on_ping,
        }.get(frame["type"])
        if handler is None:
            return await self._error("bad_request", f"Unknown frame type {frame['type'][:50]!r}.")
        try:
            await handler(frame)
        except Exception:  # a bug or an unexpected outage must cost this frame, not the connection
            logger.exception("websocket: %s frame failed", frame["type"])
            await self._error("unavailable", "The frame could not be processed; retry later.", frame.get("client_message_id"))

    async def _on_message_send(self, frame: dict) -> None:
        client_message_id = frame.get("client_message_id")
        if overload.overloaded():
            metrics.message_shed.inc()
            return await self._error(
                "unavailable", "The server is busy; retry with the same client_message_id.", client_message_id
            )
        try:
            with overload.sends_in_flight.held():
                result = await amessage_send(
                    SendRequest(
                        sender=self.user,
                        conversation_id=self.conversation_id,
                        content=frame.get("content"),
                        message_type=frame.get("message_type", "text"),
                        is_encrypted=frame.get("is_encrypted", False),
                        metadata=frame.get("metadata"),
                        reply_to=frame.get("reply_to"),
                        idempotency_key=client_message_id,
                        idempotency_field="client_message_id",
                        transport="websocket",
                    )
                )
        except ChatError as exc:
            return await self._error_for(exc, client_message_id)
        await self._send_json(
            {
                "type": "message.ack",
                "conversation_id": str(self.conversation_id),
                "client_message_id": client_message_id,
                "message": result.message.inline().as_dict(),
            }
        )

    async def _on_typing(self, frame: dict) -> None:
        now = time.monotonic()
        if now - self.last_typing >= TYPING_MIN_INTERVAL_SECONDS:
            self.last_typing = now
            await events.typing(self.conversation_id, self.user.pk)

    async def _on_read(self, frame: dict) -> None:
        try:
            # As a send does: the read event it commits is published from the loop, not by a
            # pool thread waiting on it.
            _, committed = await in_thread(events.collecting(read_marker_set))(
                user=self.user, conversation_id=self.conversation_id, seq=frame.get("seq")
            )
            await events.apublish_collected(committed)
        except ChatError as exc:
            await self._error_for(exc)

    async def _on_ping(self, frame: dict) -> None:
        await self._send_json({"type": "pong"})

    async def _error_for(self, exc: ChatError, client_message_id: object = None) -> None:
        fields = exc.detail if isinstance(exc, ValidationFailed) else None
        detail = "Invalid input." if fields else str(exc.detail)
        await self._error(exc.code, detail, client_message_id, fields)

    async def _error(self, code: str, detail: str, client_message_id: object = None, fields: dict | None = None) -> None:
        frame: dict = {"type": "error", "code": code, "detail": detail}
        if client_message_id is not None:
            frame["client_message_id"] = client_message_id
        if fields:
            frame["fields"] = fields
        await self._send_json(frame)
