"""The WebSocket endpoints (SPEC section 5): the conversation socket (`?conversation_id=`, one
conversation) and the user stream (no conversation_id: every conversation of the user, one socket
per device). Both share ChatSocket: handshake limits, the inbox fed by the process's fan-out,
bounded output, client frames through the services.

Per connection and conversation, a chat.feed.ConversationFeed lets messages out exactly once in
strictly increasing seq and changes exactly once in change order: duplicates (replay overlapping
live delivery) are dropped, an early arrival waits briefly for the missing ones, which are then
read from the store (a publish may be lost or overtaken; the store has everything).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from chat import events, metrics, overload, recheck
from chat.access import Participation, access_participations, parse_conversation_id
from chat.channel_layer import RESUBSCRIBED
from chat.feed import ConversationFeed, Cursor, parse_position
from chat.fanout import get_fanout
from chat.frames import encode_frame, frame_too_large, member_frame, message_new_frame
from core import transport
from core.batching import Batcher, per_loop
from core.errors import AccessDenied, ChatError, ValidationFailed
from core.jsonsafe import loads_bounded
from chat.presence import get_presence
from core.threads import in_thread
from chat.services.conversations import read_marker_set
from chat.services.send import SendRequest, amessage_send
from chat.ws_auth import FirstRead, authenticate
from chat.selectors import Standing, access_lost_reason, conversation_shape, stream_standings

logger = logging.getLogger(__name__)

MAX_INBOUND_FRAME_BYTES = 1024 * 1024
TYPING_MIN_INTERVAL_SECONDS = 1.0
# How long a client may sit on more than CHAT_MAX_OUTBOUND_BYTES unread before it is closed (4008).
SLOW_CLIENT_GRACE_SECONDS = 2.0

# A revocation seen on a stream's conversation group waits this long for its conversation.left
# (sent to the user's group at once) before the stream reconciles the conversation on its own.
REVOKED_LEFT_GRACE_SECONDS = 1.0
# The event a user stream puts in its own inbox to run the rule for one conversation (never published).
RECONCILE = "stream.reconcile"
# How long a user stream opened with ?resume=1 holds live events for the client's resume frame.
RESUME_WAIT_SECONDS = 5.0
# One resume frame replays at most this many times CHAT_MAX_REPLAY messages and changes in all
# (each conversation at most CHAT_MAX_REPLAY): past it, conversations are not recovered (the
# client pages REST), so one frame of 1,000 cursors cannot ask for a million replayed messages.
RESUME_BUDGET = 10  # times CHAT_MAX_REPLAY, per connection

CLOSE_MEMBERSHIP_REVOKED = 4403
CLOSE_TOO_SLOW = 4008
# 1013 (Try Again Later) is what this means, but daphne's WebSocket layer (autobahn) lets a server
# close only with 1000 or 3000-4999: 4013 mirrors it in the application range.
CLOSE_TRY_AGAIN_LATER = 4013
# At shutdown, how long a socket waits for its close frame to leave (a client that does not read
# holds its transport's buffer: it gets no close frame, but costs the shutdown no more than this).
SHUTDOWN_FLUSH_SECONDS = 1.0
CLOSE_GOING_AWAY = transport.GOING_AWAY  # the server shuts down (core.transport lets daphne send it)

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
    if transport is None or not all(hasattr(transport, a) for a in ("dataBuffer", "offset", "_tempDataLen", "disconnected")):
        return None
    # A connection that is gone holds nothing for anyone: what its buffer kept never leaves.
    return lambda: 0 if transport.disconnected else len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def socket_writer(send) -> Callable[[str], bool] | None:
    """A synchronous write of one text frame to this connection, for the delivery fast path and
    the socket's own frames: the frame made once for every socket it goes to, and written at once
    (core.transport's `send_frame_now`), without daphne's coroutine and autobahn's framing per
    socket. The callable returns False when the connection is gone. None under another server (or
    the in-process test communicator): frames then go through `send`."""
    server = transport.daphne_server(send)
    protocol = send.args[0] if isinstance(send, functools.partial) and send.args else None
    connections = getattr(server, "connections", None)
    if protocol is None or connections is None or not hasattr(protocol, "send_frame_now"):
        return None

    def write(text: str) -> bool:
        state = connections.get(protocol)
        if state is None or state.get("disconnected"):
            return False
        try:
            return protocol.send_frame_now(transport.text_frame(text))
        except Exception:  # a text with no UTF-8 encoding, or the connection closed under us
            return False

    return write


def _query_param(scope, name: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin1")).get(name)
    return values[0] if values else None


class ChatSocket(AsyncWebsocketConsumer):
    """What both kinds of connection share; a subclass makes the handshake (`handshake`), handles
    its events (`dispatch`) and names its client frames (`frame_handlers`)."""

    # No channel per socket: the process's fan-out (chat.fanout) receives each event once and
    # feeds it to this socket's inbox, drained by a task of its own while it holds anything.
    channel_layer_alias = None

    user = None
    holds_slot = False
    counted = False
    accepted = False
    closing = False
    watching_account = False
    backlog = 0  # this connection's share of chat_client_send_channel_length

    # --- handshake -------------------------------------------------------------------------
    async def connect(self) -> None:
        self.cleaned_up = False
        # This connection's name in presence entries (there is no per-socket channel name).
        self.connection_id = uuid.uuid4().hex
        self.subscribed: set[str] = set()
        # Events wait here; a drain task exists only while there are some, so an idle socket
        # holds no task (thousands of idle sockets per process).
        # (The deque itself exists only while it holds events: an empty one costs 0.7 KiB.)
        self.inbox: deque[dict] | None = None
        self.inbox_task: asyncio.Task | None = None
        self.inbox_open = False  # until the handshake is done; and closed for good after a failure
        self.last_typing = 0.0
        self.backlog_probe = socket_backlog_probe(self.scope.get("server_send"))
        self.write_now = socket_writer(self.scope.get("server_send")) if self.backlog_probe is not None else None
        self.user, first_read = await authenticate(self.scope, then=self.read_with_authentication())
        if not self.user.is_authenticated:
            return await self._refuse("unauthenticated")
        await self.handshake(first_read)

    def read_with_authentication(self) -> FirstRead | None:
        """A blocking read of the handshake's, done in the pool with the authentication (one trip
        there instead of two, shared by the handshakes that come together); its result is handed
        to handshake()."""
        return None

    async def handshake(self, first_read: Any) -> None:
        raise NotImplementedError

    async def _subscribe(self, groups: list[str]) -> bool:
        """Have the process's fan-out feed these groups to this socket. False when the channel
        layer cannot: the socket is then accepted, told `unavailable` and closed with 4013 (the
        client reconnects shortly; refusing would read as an authorization failure)."""
        try:
            fanout = get_fanout()
            if not self.watching_account:  # deactivation, password change: chat.events.ACCOUNTS_GROUP
                await fanout.watch_account(self.user.pk, self)
                self.watching_account = True
            for group in groups:
                if group not in self.subscribed:
                    await fanout.subscribe(group, self)
                    self.subscribed.add(group)
        except Exception:
            logger.warning("websocket: channel layer unavailable, closing with %d", CLOSE_TRY_AGAIN_LATER, exc_info=True)
            await self._cleanup()
            if not self.accepted:
                await self.accept()
            await self._error("unavailable", "Realtime delivery is unavailable; reconnect and resume shortly.")
            await self.close(code=CLOSE_TRY_AGAIN_LATER)
            return False
        if not self.counted:
            metrics.websocket_connections.inc()
            self.counted = True
        return True

    async def accept(self, subprotocol=None, headers=None) -> None:
        self.accepted = True
        await super().accept(subprotocol, headers)

    async def _unsubscribe_from(self, group: str) -> None:
        if group in self.subscribed:
            self.subscribed.discard(group)
            await get_fanout().unsubscribe(group, self)

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

    async def _unsubscribe(self) -> None:
        fanout = get_fanout()
        if self.watching_account:
            self.watching_account = False
            await fanout.unwatch_account(self.user.pk, self)
        while self.subscribed:
            await fanout.unsubscribe(self.subscribed.pop(), self)

    def feed(self, event: dict) -> None:
        """An event of one of this socket's groups, from the process's fan-out."""
        if self.closing or self.cleaned_up:
            return
        if self.inbox or self.inbox_task is not None or not self.inbox_open or not self._deliver_now(event):
            if self.inbox is None:
                self.inbox = deque()
            self.inbox.append(event)
            self._start_draining()

    def _deliver_now(self, event: dict) -> bool:
        """The common cases of a delivery, written from the fan-out's own callback with no task,
        to a socket that has nothing queued and whose client keeps up: the next message of a
        conversation in seq order, and typing, presence and read events (ConversationFeed
        .frame_now). Anything else (False) takes the inbox and the full path (the gates, changes,
        membership)."""
        if self.write_now is None or self.closing:
            return False
        conversation = self.conversation_of(event)
        if conversation is None or not self._client_keeps_up():
            return False
        text = conversation.frame_now(event)
        if text is None:
            return False
        if text and not self.write_now(text):
            metrics.client_message_dropped.inc()
        return True

    def conversation_of(self, event: dict) -> ConversationFeed | None:
        """The feed an event of a conversation's group goes to; None for anything else."""
        return None

    def _client_keeps_up(self) -> bool:
        backlog = self.backlog_probe()
        if backlog != self.backlog:  # (a gauge write costs, and it is nearly always 0 -> 0)
            metrics.client_send_channel_length.inc(backlog - self.backlog)
            self.backlog = backlog
        return backlog <= settings.CHAT_MAX_OUTBOUND_BYTES

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
                    self.closing = True
                    self.inbox = None
                    await self.close(code=1011)
        finally:
            self.inbox_task = None
            if not self.inbox:
                self.inbox = None

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
        # channels' AsyncConsumer.__call__ waits for the client's next message in a task of its own,
        # through asyncio.wait, to serve a channel-layer channel beside it: this consumer has none
        # (channel_layer_alias), and that task, its wait and their frames would cost every idle
        # socket about 2 KiB and every client frame a task. So the client's messages are awaited here.
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        # channels runs disconnect() only for a clean websocket.disconnect; a consumer that dies
        # of an exception (or is cancelled at shutdown) must release its slot, groups and presence
        # all the same.
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        except asyncio.CancelledError:
            # The server is shutting down: daphne cancels every connection's application before it
            # cuts the transports. Tell the client why (1001, SPEC section 5), so it reconnects at
            # once rather than after detecting a dead connection. (A cancel after the client left
            # writes nothing: daphne drops replies to a closed connection. A CancelledError that
            # is not this task's own cancellation is no shutdown.)
            task = asyncio.current_task()
            if self.accepted and not self.closing and task is not None and task.cancelling():
                self.closing = True
                await self.close(code=CLOSE_GOING_AWAY)
                await self._flush(SHUTDOWN_FLUSH_SECONDS)
            raise
        finally:
            await self._cleanup()

    async def _flush(self, timeout: float) -> None:
        """Wait (at most `timeout`) until the transport has handed what it holds for this client to
        the kernel: the server cuts every transport right after its connections' applications end,
        and Twisted writes on the loop's next turns, not at once."""
        deadline = time.monotonic() + timeout
        while self.backlog_probe is not None and self.backlog_probe() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def disconnect(self, code: int) -> None:
        await self._cleanup()

    async def _cleanup(self) -> None:
        """Release everything this connection holds; safe to run more than once."""
        if getattr(self, "cleaned_up", True):
            return
        self.cleaned_up = True
        # No more events go out (feed() stops too) while the rest is released.
        self.inbox_open = False
        await self.release_conversations()
        metrics.client_send_channel_length.dec(self.backlog)
        self.backlog = 0
        await self._unsubscribe()
        self.inbox_open = False
        self.inbox = None
        if self.inbox_task is not None and self.inbox_task is not asyncio.current_task():
            self.inbox_task.cancel()
        if self.counted:
            metrics.websocket_connections.dec()
            self.counted = False
        self._release_slot()

    async def release_conversations(self) -> None:
        """The subclass's part of _cleanup: its feeds, watches, presence."""

    # --- presence (best effort: a failure, Redis down, is logged and never costs the connection) -
    # The conversations where this socket holds a presence entry (a set once there is one).
    present_in: set[uuid.UUID] | tuple = ()

    async def _presence_enter(self, conversation_id: uuid.UUID) -> None:
        """Hold this socket's presence entry in the conversation: its user is announced online
        there if this is their first live entry, and this socket is told who else is online."""
        presence = get_presence()
        if not self.present_in:
            self.present_in = set()
        self.present_in.add(conversation_id)  # before the call: a failed join is still left on disconnect
        try:
            joined = await presence.join(conversation_id, self.user.pk, self.connection_id)
            if joined.announce:
                await events.presence(conversation_id, self.user.pk, online=True)
            for user_id in joined.online:
                if user_id != self.user.pk:
                    await self._send_json(
                        member_frame({"type": "presence", "user_id": str(user_id), "online": True}, conversation_id)
                    )
        except Exception:
            logger.warning("presence: join failed", exc_info=True)

    async def _presence_exit(self, conversation_id: uuid.UUID) -> None:
        if conversation_id not in self.present_in:
            return
        self.present_in.discard(conversation_id)
        try:
            if transport.shutting_down():
                # A restart is no presence change. Announced, it told every participant of every
                # conversation that everyone went offline and came back: two announcements per
                # socket, each to all the conversation's sockets, for nothing (chat.presence).
                await get_presence().leave_on_shutdown(conversation_id, self.user.pk, self.connection_id)
            elif await get_presence().leave(conversation_id, self.user.pk, self.connection_id):
                await events.presence(conversation_id, self.user.pk, online=False)
        except Exception:
            logger.warning("presence: leave failed", exc_info=True)

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
        if self.write_now is not None:
            # daphne's own write, without channels' and the admission's coroutines around it (what
            # `send` ends in: daphne's handle_reply awaits nothing).
            if not self.write_now(text):
                metrics.client_message_dropped.inc()
            return
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
            if self._client_keeps_up():
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)

    async def _emit(self, message: dict) -> None:
        frame = {"type": "message.new", "conversation_id": message["conversation_id"], "message": message}
        await self._send_json(frame, message_new_frame(message))

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
        handler = self.frame_handlers().get(frame["type"])
        if handler is None:
            return await self._error("bad_request", f"Unknown frame type {frame['type'][:50]!r}.")
        try:
            await handler(frame)
        except Exception:  # a bug or an unexpected outage must cost this frame, not the connection
            logger.exception("websocket: %s frame failed", frame["type"])
            await self._error("unavailable", "The frame could not be processed; retry later.", frame.get("client_message_id"))

    def frame_handlers(self) -> dict[str, Callable[[dict], Awaitable[None]]]:
        return {"ping": self._on_ping}

    async def _send_message(self, conversation_id: object, frame: dict) -> None:
        """message.send: through the one send service (which authorizes), acknowledged here."""
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
                        conversation_id=conversation_id,
                        content=frame.get("content"),
                        message_type=frame.get("message_type", "text"),
                        is_encrypted=frame.get("is_encrypted", False),
                        metadata=frame.get("metadata"),
                        attachments=frame.get("attachments"),
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
                "conversation_id": str(result.message.conversation_id),
                "client_message_id": client_message_id,
                "message": result.message.inline().as_dict(),
            }
        )

    async def _typing_in(self, conversation_id: uuid.UUID) -> None:
        """typing: the caller is known to be in the conversation (the subclass checks)."""
        now = time.monotonic()
        if now - self.last_typing >= TYPING_MIN_INTERVAL_SECONDS:
            self.last_typing = now
            await events.typing(conversation_id, self.user.pk)

    async def _read_in(self, conversation_id: object, frame: dict) -> None:
        try:
            # As a send does: the read event it commits is published from the loop, not by a
            # pool thread waiting on it.
            _, committed = await in_thread(events.collecting(read_marker_set))(
                user=self.user, conversation_id=conversation_id, seq=frame.get("seq")
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


def _participations_or_denied(asked: list[tuple[Any, object]]) -> list[Participation | AccessDenied]:
    """For each (user, conversation id): the participation the rule grants, or AccessDenied. One statement."""
    return [participation or AccessDenied() for participation in access_participations(asked)]


async def _authorize_together(asked: list[tuple[Any, uuid.UUID]]) -> list[Participation | AccessDenied]:
    return await in_thread(_participations_or_denied)(asked)


# The handshakes' authoritative read (after subscribing): those that reach it while one is under
# way share the next trip to the thread pool and its one statement, as a reconnect storm's do.
_authorized_after_subscribing = per_loop(
    lambda: Batcher(_authorize_together, max_batch=settings.CHAT_MAX_PENDING_HANDSHAKES)
)


class ChatConsumer(ChatSocket):
    """The conversation socket: `ws/chat/?conversation_id=<uuid>[&after_seq=<n>][&after_change=<m>]`."""

    conversation_id: uuid.UUID | None = None
    presence_task: asyncio.Task | None = None
    delivery: ConversationFeed | None = None  # the conversation, from the end of the handshake on

    # --- handshake -------------------------------------------------------------------------
    def read_with_authentication(self) -> FirstRead:
        # Whether the user may subscribe to the conversation asked for (authoritative is the read
        # after subscribing, below).
        return _participations_or_denied, _query_param(self.scope, "conversation_id")

    async def handshake(self, first_read: Participation | AccessDenied) -> None:
        after_seq, after_change = _query_param(self.scope, "after_seq"), _query_param(self.scope, "after_change")
        cursor = Cursor(seq=parse_position(after_seq), change=parse_position(after_change))
        if (after_seq is not None and cursor.seq is None) or (after_change is not None and cursor.change is None):
            return await self._refuse("bad after_seq or after_change")
        if not self._reserve_slot():
            return await self._refuse("connection limit")
        if isinstance(first_read, AccessDenied):
            return await self._refuse("not a participant")
        self.conversation_id = first_read.conversation_id
        self.conversation_group = events.conversation_group(self.conversation_id)

        # Subscribe first, then read where the conversation stands: every later message is then
        # either already in the store or on its way to this socket's inbox (and a revocation of
        # the account, such as a deactivation, to this socket).
        if not await self._subscribe([self.conversation_group]):
            return
        # Authorize again now that revocations reach this socket: a ban or removal committed
        # between the first check and the subscription was published where we could not hear it.
        # This read is also where the conversation stands (last_seq, last_change).
        try:
            participation = await _authorized_after_subscribing().submit((self.user, self.conversation_id))
        except AccessDenied:
            await self._cleanup()
            return await self._refuse("revoked during the handshake")
        # And again every CHAT_MEMBERSHIP_RECHECK seconds, for revocations that announce nothing.
        recheck.watch(self, participation.participant_id)
        self.delivery = ConversationFeed(
            conversation_id=self.conversation_id,
            user_id=self.user.pk,
            send=self._send_json,
            # Looked up on each call, not bound now: tests replace _emit on a connected socket.
            emit_message=lambda message: self._emit(message),
            last_seq=participation.last_seq,
            last_change=participation.last_change,
            cursor=cursor,
        )

        overload.loop_lag.start()
        await self.accept()
        await self._send_json(
            {
                "type": "ready",
                "conversation_id": str(self.conversation_id),
                "user_id": str(self.user.pk),
                "last_seq": participation.last_seq,
                "last_change": participation.last_change,
                "recovered": self.delivery.recovered,
            }
        )
        await self.delivery.replay()
        # Live events waited in the inbox since the subscription; they go out after the ready
        # frame and the replay (the gates drop what the replay already delivered).
        self.inbox_open = True
        self._start_draining()
        # Presence is best effort and must not hold up the handshake: when thousands of clients
        # reconnect at once (a server restart), their joins queue for Redis connections, and a
        # handshake that waited for its join would time out and come back as one more.
        self.presence_task = asyncio.create_task(self._presence_join())
        # A new subscription takes effect when Redis has processed it, which channels-redis does
        # not wait for: a message published in between, and committed after the read above, would
        # only be revealed by a later message. One look at the store once the subscription is
        # surely live closes that window (shared with the sockets subscribed meanwhile).
        recheck.settle(self)

    async def release_conversations(self) -> None:
        recheck.unwatch(self)
        if self.presence_task is not None and not self.presence_task.done():
            self.presence_task.cancel()
        if self.conversation_id is not None:
            await self._presence_exit(self.conversation_id)
        if self.delivery is not None:
            self.delivery.close()

    async def _presence_join(self) -> None:
        try:
            await self._presence_enter(self.conversation_id)
        finally:
            self.presence_task = None  # a finished task kept would cost memory for the socket's life

    # --- channel-layer events ----------------------------------------------------------------
    def conversation_of(self, event: dict) -> ConversationFeed | None:
        return self.delivery if event.get("group") == self.conversation_group else None

    async def conversation_event(self, event: dict) -> None:
        try:
            await self.delivery.handle(event)
        except Exception:
            metrics.broadcast_panic.inc()
            logger.exception("delivery failed on conversation %s", self.conversation_id)
            raise

    message_new = message_updated = message_deleted = typing = presence = read = conversation_event
    reaction_added = reaction_removed = conversation_event

    async def conversation_updated(self, event: dict) -> None:
        """Ignored: the conversation's details are for user streams."""

    async def membership_revoked(self, event: dict) -> None:
        """Removed or banned from this conversation, or the account revoked (chat.events.ACCOUNTS_GROUP)."""
        if event["user_id"] == str(self.user.pk):
            await self.revoke()

    def catch_up(self, last_seq: int, last_change: int) -> None:
        """chat.recheck: the conversation has committed up to these."""
        if self.delivery is not None and not self.closing:
            self.delivery.catch_up(last_seq, last_change)

    # --- inbound frames ------------------------------------------------------------------------
    def frame_handlers(self) -> dict[str, Callable[[dict], Awaitable[None]]]:
        return {
            **super().frame_handlers(),
            "message.send": lambda frame: self._send_message(self.conversation_id, frame),
            "typing": lambda frame: self._typing_in(self.conversation_id),
            "read": lambda frame: self._read_in(self.conversation_id, frame),
        }


class _StreamedConversation:
    """One conversation of a user stream, as chat.recheck watches it."""

    def __init__(self, stream: "UserStreamConsumer", conversation_id: uuid.UUID) -> None:
        self.stream = stream
        self.conversation_id = conversation_id

    async def revoke(self) -> None:
        self.stream.reconcile(self.conversation_id)

    def catch_up(self, last_seq: int, last_change: int) -> None:
        feed = self.stream.feeds.get(self.conversation_id)
        # Not before the stream is live: a ?resume=1 stream's replay goes out first.
        if feed is not None and self.stream.inbox_open and not self.stream.closing:
            feed.catch_up(last_seq, last_change)


def parse_cursors(value: object) -> dict[uuid.UUID, Cursor]:
    """A resume frame's cursors, or ValueError saying what is wrong with them."""
    if not isinstance(value, dict):
        raise ValueError('"cursors" must be an object of conversation ids.')
    if len(value) > settings.CHAT_MAX_RESUME_CONVERSATIONS:
        raise ValueError(f"A resume names at most {settings.CHAT_MAX_RESUME_CONVERSATIONS} conversations.")
    cursors: dict[uuid.UUID, Cursor] = {}
    for key, position in value.items():
        try:
            conversation_id = uuid.UUID(key)
        except ValueError:
            raise ValueError(f"{key[:50]!r} is not a conversation id.") from None
        if not isinstance(position, dict) or not set(position) <= {"seq", "change"}:
            raise ValueError('Each cursor is an object with "seq" and/or "change".')
        seq, change = parse_position(position.get("seq")), parse_position(position.get("change"))
        if (seq is None and position.get("seq") is not None) or (change is None and position.get("change") is not None):
            raise ValueError('"seq" and "change" are non-negative integers.')
        if isinstance(position.get("seq"), str) or isinstance(position.get("change"), str):
            raise ValueError('"seq" and "change" are non-negative integers.')
        cursors[conversation_id] = Cursor(seq=seq, change=change)
    return cursors


class UserStreamConsumer(ChatSocket):
    """The user stream: `ws/chat/` without conversation_id, every conversation of the user.

    Its conversations are a ConversationFeed each, subscribed through the process's fan-out like
    any conversation socket (one subscription per conversation per process, however many sockets
    and streams listen). Membership arrives on the user's own group: conversation.joined adds a
    feed, conversation.left delivers the conversation up to where it stood at the leave, then
    drops it. Events are handled one at a time in arrival order, so nothing of a conversation
    goes out after its conversation.left."""

    resuming = False  # a resume frame is being answered: ?resume=1's wait must not end it halfway
    truncated = False  # the handshake carried only CHAT_STREAM_MAX_CONVERSATIONS of the user's conversations
    # What the resume frames of one connection may replay in all, together (set in handshake()):
    # a client resumes once per connection, and an 80-byte frame must not buy thousands of frames
    # again and again.
    resume_budget = 0

    # --- handshake -------------------------------------------------------------------------
    async def handshake(self, first_read: None) -> None:
        # (No read with the authentication: the first read of the user's conversations must come
        # after their own group's subscription, below.)
        self.resume_budget = RESUME_BUDGET * settings.CHAT_MAX_REPLAY
        self.feeds: dict[uuid.UUID, ConversationFeed] = {}
        self.watched: dict[uuid.UUID, _StreamedConversation] = {}
        self.by_group: dict[str, uuid.UUID] = {}
        self.tasks: set[asyncio.Task] = set()
        self.own_group = events.user_group(self.user.pk)
        if not self._reserve_slot():
            return await self._refuse("connection limit")
        # The user's own group first: a join or leave from now on reaches this socket, and one
        # that committed before the read below is already in it.
        if not await self._subscribe([self.own_group]):
            return
        limit = settings.CHAT_STREAM_MAX_CONVERSATIONS
        carried = await in_thread(stream_standings)(user=self.user, limit=limit + 1)
        truncated = self.truncated = len(carried) > limit
        groups = [events.conversation_group(standing.conversation_id) for standing in carried[:limit]]
        if not await self._subscribe(groups):
            return
        # Read again now that the conversations' events reach this socket: where each stands
        # (every later message is in the store or on its way here), and which are still the
        # user's (a removal in between was published where we could not hear it).
        standings = await in_thread(stream_standings)(
            user=self.user, conversation_ids=[standing.conversation_id for standing in carried[:limit]]
        )
        for standing in standings:
            self._open_feed(standing)
        for group in set(groups) - set(self.by_group):
            await self._unsubscribe_from(group)

        overload.loop_lag.start()
        await self.accept()
        await self._send_json(
            {
                "type": "ready",
                "user_id": str(self.user.pk),
                "conversations": {
                    str(standing.conversation_id): {"last_seq": standing.last_seq, "last_change": standing.last_change}
                    for standing in standings
                },
                "truncated": truncated,
            }
        )
        if _query_param(self.scope, "resume") == "1":
            # The client resumes: live events wait for its resume frame (a little while at most),
            # so that what it missed goes out before them.
            self._spawn(self._go_live_after(RESUME_WAIT_SECONDS))
        else:
            self._go_live()

    def _go_live(self) -> None:
        if self.inbox_open or self.closing:
            return
        self.inbox_open = True
        self._start_draining()
        # As the conversation socket does: one look at the store once the subscriptions are
        # surely live (a message published before Redis processed them).
        for watch in self.watched.values():
            recheck.settle(watch)
        # The user is online in every conversation the stream carries: announced in the
        # background, one conversation after the other (best effort, as for a conversation socket).
        self._spawn(self._presence_enter_each(list(self.feeds)))

    async def _presence_enter_each(self, conversation_ids: list[uuid.UUID]) -> None:
        for conversation_id in conversation_ids:
            if conversation_id in self.feeds:  # still carried (not left meanwhile)
                await self._presence_enter(conversation_id)

    async def _go_live_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self.resuming:  # a resume under way goes live when it is done, not halfway through
            self._go_live()

    def _open_feed(self, standing: Standing) -> ConversationFeed:
        conversation_id = standing.conversation_id
        feed = self.feeds[conversation_id] = ConversationFeed(
            conversation_id=conversation_id,
            user_id=self.user.pk,
            send=self._send_json,
            emit_message=self._emit,
            last_seq=standing.last_seq,
            last_change=standing.last_change,
        )
        self.by_group[events.conversation_group(conversation_id)] = conversation_id
        watch = self.watched[conversation_id] = _StreamedConversation(self, conversation_id)
        recheck.watch(watch, standing.participant_id)
        return feed

    async def _close_feed(self, conversation_id: uuid.UUID) -> None:
        feed = self.feeds.pop(conversation_id)
        feed.close()
        await self._presence_exit(conversation_id)
        group = events.conversation_group(conversation_id)
        self.by_group.pop(group, None)
        recheck.unwatch(self.watched.pop(conversation_id))
        await self._unsubscribe_from(group)

    def _spawn(self, work) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def release_conversations(self) -> None:
        for task in list(getattr(self, "tasks", ())):
            task.cancel()
        for watch in getattr(self, "watched", {}).values():
            recheck.unwatch(watch)
        for feed in getattr(self, "feeds", {}).values():
            feed.close()
        # All at once: they share the presence pipelines, and while Redis is down each would
        # otherwise wait out its own timeout in turn (a stream carries up to 500 conversations).
        await asyncio.gather(*(self._presence_exit(conversation_id) for conversation_id in list(self.present_in)))

    # --- events ------------------------------------------------------------------------------
    def conversation_of(self, event: dict) -> ConversationFeed | None:
        conversation_id = self.by_group.get(event.get("group"))
        return self.feeds.get(conversation_id) if conversation_id is not None else None

    async def dispatch(self, event: dict) -> None:
        group = event.get("group")
        if group is None:  # the connection's own: websocket.connect, .receive, .disconnect
            return await super().dispatch(event)
        if group == events.ACCOUNTS_GROUP:
            return await self._account_revoked(event)
        if group == self.own_group:
            handler = {
                "conversation.joined": self._joined,
                "conversation.left": self._left,
                RECONCILE: self._reconcile_now,
                RESUBSCRIBED: self._joins_lost_with_redis,
            }.get(event["type"])
            if handler is not None:
                await handler(event)
            return
        conversation_id = self.by_group.get(group)
        feed = self.feeds.get(conversation_id) if conversation_id is not None else None
        if feed is None:
            return  # a conversation this stream no longer carries: nothing of it after its left
        if event["type"] == "membership.revoked":
            if event["user_id"] == str(self.user.pk):
                # conversation.left (with the reason, to the user's group) normally follows at once.
                self.reconcile_later(conversation_id, delay=REVOKED_LEFT_GRACE_SECONDS)
            return
        if event["type"] == "conversation.updated":
            await self._send_json(
                {"type": "conversation.updated", "conversation_id": event["conversation_id"], "conversation": event["conversation"]}
            )
            return
        try:
            await feed.handle(event)
        except Exception:
            metrics.broadcast_panic.inc()
            logger.exception("delivery failed on conversation %s", conversation_id)
            raise

    async def _joined(self, event: dict) -> None:
        conversation_id = uuid.UUID(event["conversation_id"])
        if conversation_id in self.feeds:
            return
        # The rule decides, now: the event may be stale (left again since), or announce a
        # participant who has no access (a banned user added in the admin).
        standings = await in_thread(stream_standings)(user=self.user, conversation_ids=[conversation_id])
        if not standings:
            return
        frame = {
            "type": "conversation.joined",
            "conversation_id": event["conversation_id"],
            "conversation": event["conversation"],
            "last_seq": event["last_seq"],
            "last_change": event["last_change"],
        }
        if len(self.feeds) >= settings.CHAT_STREAM_MAX_CONVERSATIONS:
            # Anyone may add you to their groups: joins cannot grow a stream without bound either.
            # The client is told, and reads this one over REST (or on a reconnect, if it is among
            # the most recently active then).
            return await self._send_json({**frame, "carried": False})
        if not await self._subscribe([events.conversation_group(conversation_id)]):
            return
        # From where the conversation stood at the join: what was sent since is in the store
        # (the gate reads it when a later message shows the gap, or the settle look below).
        self._open_feed(
            Standing(standings[0].participant_id, conversation_id, event["last_seq"], event["last_change"])
        )
        await self._send_json(frame)
        recheck.settle(self.watched[conversation_id])
        self._spawn(self._presence_enter_each([conversation_id]))

    async def _joins_lost_with_redis(self, event: dict) -> None:
        """The process's subscriptions came back after Redis went away (chat.fanout): joins
        published meanwhile are lost. Every conversation the rule grants and the stream does not
        carry was joined since, and is joined now, from where it stands. (A stream that was
        truncated at its handshake cannot tell a join from a conversation it never carried: its
        client reads the list over REST.)"""
        limit = settings.CHAT_STREAM_MAX_CONVERSATIONS
        if self.truncated or len(self.feeds) >= limit:
            return
        try:
            standings = await in_thread(stream_standings)(user=self.user, limit=limit)
            for standing in standings:
                if standing.conversation_id in self.feeds:
                    continue
                if len(self.feeds) >= limit:
                    break  # (a join past the limit would be announced, not carried, at every restart)
                shape = await in_thread(conversation_shape)(conversation_id=standing.conversation_id)
                await self._joined(
                    {"conversation_id": str(standing.conversation_id), "conversation": shape,
                     "last_seq": standing.last_seq, "last_change": standing.last_change}
                )
        except Exception:  # (the database is away too: the client's next reconnect reads the list)
            logger.warning("websocket: reading the stream's conversations after resubscribing failed", exc_info=True)

    async def _left(self, event: dict) -> None:
        conversation_id = uuid.UUID(event["conversation_id"])
        feed = self.feeds.get(conversation_id)
        if feed is None:
            return
        if event.get("last_seq") is not None:
            # Everything committed while the user was a member goes out first.
            await feed.catch_up_now(event["last_seq"], event["last_change"])
        await self._close_feed(conversation_id)
        await self._send_json({"type": "conversation.left", "conversation_id": str(conversation_id), "reason": event["reason"]})
        # Joins and leaves of one user are published by whichever process made them: a re-join's
        # event may have overtaken this leave's, and was passed over while the stream still
        # carried the conversation. The rule says which is the present.
        if event.get("last_seq") is None:  # (not an event's: the stream's own reconcile, which read the rule)
            return
        standings = await in_thread(stream_standings)(user=self.user, conversation_ids=[conversation_id])
        if standings:
            shape = await in_thread(conversation_shape)(conversation_id=conversation_id)
            await self._joined(
                {"conversation_id": str(conversation_id), "conversation": shape,
                 "last_seq": event["last_seq"], "last_change": event["last_change"]}
            )

    async def _account_revoked(self, event: dict) -> None:
        if event["user_id"] == str(self.user.pk):
            await self.revoke()

    def reconcile(self, conversation_id: uuid.UUID) -> None:
        """chat.recheck found the access gone: through the inbox, so that no event of the
        conversation that the process receives from now on goes out before the stream has left it."""
        self.feed({"type": RECONCILE, "group": self.own_group, "conversation_id": str(conversation_id)})

    def reconcile_later(self, conversation_id: uuid.UUID, *, delay: float) -> None:
        """A revocation without its conversation.left yet: reconcile after `delay`."""
        self._spawn(self._reconcile_after(conversation_id, delay))

    async def _reconcile_after(self, conversation_id: uuid.UUID, delay: float) -> None:
        await asyncio.sleep(delay)
        self.reconcile(conversation_id)

    async def _reconcile_now(self, event: dict) -> None:
        """If the stream still carries the conversation and the rule says no, leave it."""
        conversation_id = uuid.UUID(event["conversation_id"])
        if conversation_id not in self.feeds:
            return
        try:
            standings = await in_thread(stream_standings)(user=self.user, conversation_ids=[conversation_id])
            if standings:
                # Access again (re-added, the ban lifted): watched from now on by this participation
                # (chat.recheck stopped watching the one it found without access).
                recheck.watch(self.watched[conversation_id], standings[0].participant_id)
                return
            reason = await in_thread(access_lost_reason)(user=self.user, conversation_id=conversation_id)
        except Exception:
            # A revocation was announced or found, and this read could not say otherwise: the
            # conversation is left (the reason unknown, "removed" says it), not kept unwatched.
            logger.warning("websocket: membership read failed; leaving the conversation", exc_info=True)
            reason = "removed"
        if reason == "inactive":
            return await self.revoke()
        await self._left({"conversation_id": str(conversation_id), "reason": reason})

    # --- inbound frames ------------------------------------------------------------------------
    def frame_handlers(self) -> dict[str, Callable[[dict], Awaitable[None]]]:
        return {
            **super().frame_handlers(),
            "message.send": lambda frame: self._send_message(frame.get("conversation_id"), frame),
            "typing": self._on_typing,
            "read": lambda frame: self._read_in(frame.get("conversation_id"), frame),
            "resume": self._on_resume,
        }

    async def _on_typing(self, frame: dict) -> None:
        try:
            conversation_id = parse_conversation_id(frame.get("conversation_id"))
        except AccessDenied:
            conversation_id = None
        if conversation_id not in self.feeds:  # the stream carries exactly the user's conversations
            return await self._error("forbidden", "You are not a participant of this conversation.")
        await self._typing_in(conversation_id)

    async def _on_resume(self, frame: dict) -> None:
        try:
            cursors = parse_cursors(frame.get("cursors"))
        except ValueError as exc:
            return await self._error("bad_request", str(exc))
        self.resuming = True
        try:
            await self._resume(cursors)
        finally:
            self.resuming = False
        self._go_live()

    async def _resume(self, cursors: dict[uuid.UUID, Cursor]) -> None:
        # The membership rule and where each conversation stands, for all of them in one read.
        standings = {
            standing.conversation_id: standing
            for standing in await in_thread(stream_standings)(user=self.user, conversation_ids=list(cursors))
        }
        outcome: dict[str, dict] = {}
        budget = self.resume_budget
        for conversation_id, cursor in cursors.items():
            standing, feed = standings.get(conversation_id), self.feeds.get(conversation_id)
            if standing is None:
                # Not the user's, or no such conversation: the same answer for both.
                outcome[str(conversation_id)] = {"recovered": False, "forbidden": True}
            elif feed is None:
                # The user's, but beyond what this stream carries (CHAT_STREAM_MAX_CONVERSATIONS).
                outcome[str(conversation_id)] = {"recovered": False}
            else:
                missing = feed.missing(cursor)
                recovered = missing <= budget and await feed.resume(cursor, standing.last_seq, standing.last_change)
                if recovered:
                    budget -= missing
                    self.resume_budget -= missing
                outcome[str(conversation_id)] = {"recovered": recovered}
        await self._send_json({"type": "resumed", "conversations": outcome})
