"""Limits daphne's HTTP transport (Twisted) applies before the application sees a request.

daphne buffers a whole request body before it calls the application (Twisted writes it to a
temporary file, then daphne queues all of it at once as `http.request` messages), so an ASGI
middleware alone cannot keep a 300 MiB body out of the process. daphne has no option for it; these
subclasses, installed by chatproject/asgi.py through `install()`, apply core.bodylimit's caps while
the body arrives:
- a declared Content-Length over the cap is answered with the JSON 413 as soon as the headers are in;
- a chunked body is answered the same way once its running total passes the cap;
- the rest of a refused body is read and dropped (never stored) until it ends or for at most
  LINGER_SECONDS, then the connection closes: a client that writes its whole body before reading
  (most do) still reads the 413 instead of a connection reset.
Header limits stay Twisted's (16 KiB per line and in all, 500 lines); what changes is the answer:
a JSON 431 instead of a silently dropped connection (one line too long) or a bare 400 (all lines
too long), and a JSON 400 for a malformed request instead of an empty one.
"""
from __future__ import annotations

import io
import json
import struct
from urllib.parse import unquote, urlsplit

from daphne import http_protocol
from twisted.internet import tcp
from twisted.web import http

from core.bodylimit import body_cap_for, too_large_body

LINGER_SECONDS = 5.0
GOING_AWAY = 1001  # the WebSocket close code of a server shutting down
# Connections accepted whose request headers have not all come yet ("arrivals"): a wake-up of the
# listening socket takes in no more connections than bring them to this many, and at least one
# (see the server below). A connection stops counting after ARRIVAL_SECONDS whatever it sent.
ARRIVALS_AT_ONCE = 64
ARRIVAL_SECONDS = 0.5

REASONS = {400: b"Bad Request", 413: b"Content Too Large", 431: b"Request Header Fields Too Large"}


def raw_response(status: int, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (status, REASONS[status], len(body))
    ) + body


def _answer_and_close(channel: http.HTTPChannel, status: int, detail: str, code: str) -> None:
    if channel.transport is None:
        return
    channel.transport.write(raw_response(status, json.dumps({"detail": detail, "code": code}).encode()))
    channel.transport.loseConnection()


class CappedHTTPChannel(http.HTTPChannel):
    arrival = None  # the timer of a connection the server counts as arriving (its headers not in yet)

    def connectionMade(self) -> None:
        super().connectionMade()
        server = getattr(self.factory, "server", None)
        if hasattr(server, "arrived"):  # core.transport's server (not daphne's own, nor a test's)
            self.arrival = server.arrived(self)

    def arrival_over(self) -> None:
        """The request's headers are in, the connection closed, or ARRIVAL_SECONDS passed."""
        timer, self.arrival = self.arrival, None
        if timer is not None:
            if timer.active():
                timer.cancel()
            self.factory.server.arrival_over()

    def connectionLost(self, reason) -> None:
        self.arrival_over()
        super().connectionLost(reason)

    def lineLengthExceeded(self, line: bytes) -> None:
        # Twisted's default drops the connection without a word.
        _answer_and_close(self, 431, f"A request header line is longer than {self.MAX_LENGTH} bytes.",
                          "request_header_fields_too_large")

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderSize > self.totalHeadersSize or self._receivedHeaderCount > self.maxHeaders:
            _answer_and_close(
                self, 431, f"Request headers exceed {self.totalHeadersSize} bytes or {self.maxHeaders} lines.",
                "request_header_fields_too_large",
            )
        else:
            _answer_and_close(self, 400, "Malformed HTTP request.", "bad_request")


class CappedWebRequest(http_protocol.WebRequest):
    refused = False

    def gotLength(self, length: int | None) -> None:
        if isinstance(self.channel, CappedHTTPChannel):
            self.channel.arrival_over()
        target = getattr(self.channel, "_path", b"/")
        self.body_cap = body_cap_for(unquote(urlsplit(target.decode("latin-1")).path))
        self.body_received = 0
        if length is not None and length > self.body_cap:
            # No "100 Continue" for a body that is refused anyway.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self.body_received += len(data)
        if self.body_received > self.body_cap:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self.refused = True
        self.content = io.BytesIO()  # what was stored so far is dropped
        from twisted.internet import reactor  # daphne has installed its reactor by the time a request arrives

        transport = self.channel.transport
        transport.write(raw_response(413, too_large_body(self.body_cap)))
        reactor.callLater(LINGER_SECONDS, transport.loseConnection)

    def process(self):
        if self.refused:
            # The whole body has been read and dropped: close now (the answer is already out).
            self.channel.transport.loseConnection()
            return None
        return super().process()

    def connectionLost(self, reason) -> None:
        if self.refused:
            # Never handed to the application: nothing of daphne's to clean up.
            return http.Request.connectionLost(self, reason)
        return super().connectionLost(reason)


class DirectWriteServer(tcp.Server):
    """A server-side TCP connection whose writes go to the kernel at once while nothing waits in
    its buffer.

    Twisted's write only buffers: it registers the socket with the event loop, writes on the loop's
    next turn and unregisters it, two epoll calls and a callback per write. A WebSocket connection
    writes little at a time (the handshake's answer, a frame, a ping every 20 s to each of
    thousands of idle sockets), almost always with an empty buffer, so that round was most of what
    a write cost. Here a write with nothing waiting before it is sent at once. Everything else
    takes Twisted's path as before, so bytes keep their order and Twisted's rules hold: what the
    kernel does not take, any write while something waits (twisted.web's responses, which start
    with a writeSequence), a connection closing or aborted, one whose producer is a pull producer
    (Twisted asks it for more only after a buffered write), and one that started TLS on itself
    (its TLS layer writes through Twisted's own path; a TLS port's connections write their
    encrypted bytes here like any other). An error on the send (a peer gone) is left to the
    buffered path too, where Twisted finds it and closes the connection its own way."""

    def write(self, data: bytes) -> None:
        if (
            type(data) is bytes
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnected
            and not self._aborting
            and not self.TLS
            and not self._tempDataBuffer
            and self.offset == len(self.dataBuffer)
            and (self.producer is None or self.streamingProducer)
        ):
            try:
                sent = self.socket.send(data)
            except OSError:  # EAGAIN; or a dead peer, which the buffered path then finds
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)


def _capped_channel(factory: http.HTTPFactory) -> http._GenericHTTPChannelProtocol:
    return http._GenericHTTPChannelProtocol(CappedHTTPChannel())


class CappedHTTPFactory(http_protocol.HTTPFactory):
    protocol = _capped_channel

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = CappedWebRequest
        return protocol


def _websocket_factory_class():
    """daphne's WebSocket factory, building connections that read autobahn's settings from their
    class. autobahn copies its ~30 settings from the factory onto every new connection object and
    formats the list with pprint for a debug log line, whether or not that line is logged: 9 % of
    a handshake's CPU (docs/performance.md), and a dict of 30 entries per open socket. Here the
    settings are class attributes of one protocol class per factory, set when daphne sets them,
    and autobahn's copy loop has nothing to copy (CONFIG_ATTRS empty); a connection that changes a
    setting still sets it on itself. Its connections may also close with 1001 (going away)."""
    from autobahn.twisted.websocket import WebSocketServerProtocol
    from daphne import ws_protocol

    settings = tuple(WebSocketServerProtocol.CONFIG_ATTRS)

    class Protocol(ws_protocol.WebSocketProtocol):
        CONFIG_ATTRS = ()

        def send_frame_now(self, frame: bytes) -> bool:
            """Write one frame made by `text_frame`; False when the connection is not open.

            daphne's own write (handle_reply, then autobahn's sendMessage) frames every message
            again for every connection, for a fan-out that writes the same frame to every local
            socket of a conversation; here the frame made once is written as it is (through the
            transport's write, which hands it to the kernel at once: `DirectWriteServer`)."""
            if self.state != self.STATE_OPEN:
                return False
            self.sendData(frame)
            return True

        def serverClose(self, code=None):
            # autobahn's sendClose lets a server close only with 1000 or 3000-4999; a server that
            # shuts down says 1001 (RFC 6455 section 7.4.1, SPEC section 5).
            if code == GOING_AWAY:
                self.sendCloseFrame(code=code, isReply=False)
            else:
                super().serverClose(code)

    class Factory(ws_protocol.WebSocketFactory):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._share_settings()

        def setProtocolOptions(self, *args, **kwargs):
            super().setProtocolOptions(*args, **kwargs)
            self._share_settings()

        def _share_settings(self) -> None:
            values = {name: getattr(self, name) for name in settings}
            # A function setting (perMessageCompressionAccept) must stay a plain function, not a method.
            values = {name: staticmethod(value) if callable(value) else value for name, value in values.items()}
            self.protocol = type("WebSocketProtocol", (Protocol,), values)

    return Factory


def _server_class():
    """daphne's server, with a shutdown that takes no new connection and reaches every connection's
    application.

    On SIGTERM daphne cancels each connection's application, waits for them to end, then cuts the
    transports: the applications close their sockets (1001) and release what they hold (presence,
    subscriptions). But daphne's own step reads `details["application_instance"]`, a key it
    deletes once an application has ended while its connection stays open (an HTTP keep-alive
    connection between requests): one such connection raised a KeyError that ended the step
    before it cancelled anything, and every WebSocket was cut without a close frame or clean-up.
    And daphne keeps listening while its applications end: a client told 1001 that reconnected at
    once was accepted by the server going away, handshaken, then cut. Here the server stops
    listening first (the clients' attempts are refused, and they go to the next server or retry).
    It pauses and resumes accepting new connections for the handshakes' admission control, and it
    takes them in at the pace their requests come: at launch the listen queue may hold a thousand
    clients of a restarted server, and Twisted accepts up to 100 per wake-up (20 more after each
    wake-up that took that many), all before the first of them has sent its request; each would
    then reach the handshake admission at once, and most be refused into their backoff. So a
    wake-up takes in no more connections than bring the arrivals (those whose request headers have
    not come yet) to ARRIVALS_AT_ONCE, and at least one: the rest wait in the kernel's listen
    queue, which costs nothing. (At least one, and no pause for it: connections that send nothing,
    someone's on purpose, cannot stop the server accepting; they slow it to one connection per
    wake-up, for ARRIVAL_SECONDS each.) Its TCP connections write at once (DirectWriteServer)."""
    import asyncio
    import logging

    from daphne.server import Server
    from twisted.internet import defer

    logger = logging.getLogger("daphne.server")

    class ChatServer(Server):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            from twisted.internet import reactor  # (daphne installed its reactor on import)

            self.clock = reactor
            self.listening_ports = []
            self.arrivals = 0  # connections accepted whose request headers are not in yet

        def listen_success(self, port):
            self.listening_ports.append(port)
            accept = port.doRead

            def accept_with_room():
                port.numberAccepts = max(1, min(port.numberAccepts, ARRIVALS_AT_ONCE - self.arrivals))
                return accept()

            port.doRead = accept_with_room  # (the reactor looks it up on the port for each wake-up)
            if getattr(port, "transport", None) is tcp.Server:  # (a TCP port: not a UNIX socket's)
                port.transport = DirectWriteServer  # the class the port makes its connections of
            return super().listen_success(port)

        def arrived(self, channel):
            """A connection was accepted (CappedHTTPChannel): it counts until its request's headers
            are in; the timer that ends its count at the latest is returned."""
            self.arrivals += 1
            return self.clock.callLater(ARRIVAL_SECONDS, channel.arrival_over)

        def arrival_over(self):
            self.arrivals -= 1

        def pause_accepting(self):
            """Leave new connections in the kernel's listen queue (chat.ws_auth.HandshakeAdmission,
            while every handshake slot is taken)."""
            for port in self.listening_ports:
                port.stopReading()

        def resume_accepting(self, at_most: int):
            """Accept again, at most `at_most` connections per port in the next wake-up. Twisted
            accepts up to `numberAccepts` at once, so a listen queue of thousands would otherwise
            come in one burst; after that wake-up it raises its own allowance by 20 each time it
            takes that many (within the room among the arrivals), until the next pause, which comes
            when the slots are taken again (the handshakes admitted meanwhile wait their turn)."""
            for port in self.listening_ports:
                if port.connected and not port.disconnecting:  # (not once shutting down)
                    port.numberAccepts = max(1, at_most)
                    port.startReading()

        def kill_all_applications(self):
            global _shutting_down
            _shutting_down = True
            for port in self.listening_ports:
                port.stopListening()
            running = []
            for details in self.connections.values():
                instance = details.get("application_instance")
                if instance is not None and not instance.done():
                    instance.cancel()
                    running.append(instance)
            logger.info("Killed %i pending application instances", len(running))
            ended = defer.Deferred.fromFuture(asyncio.gather(*running))
            ended.addErrback(lambda _: None)
            return ended

    return ChatServer


_shutting_down = False


def shutting_down() -> bool:
    """Whether this process's server is shutting down: it cancelled every connection's application
    (SIGTERM), as opposed to one connection's ending (its client left, or daphne cancelled an
    application that did not end in time after that)."""
    return _shutting_down


def daphne_server(send):
    """The daphne server behind a connection's own `send` (`partial(server.handle_reply, protocol)`,
    kept by chat.ws_auth.keep_server_send before any middleware wraps it), or None under another
    server or the in-process test communicator."""
    return getattr(getattr(send, "func", None), "__self__", None)


_last_frame: tuple[str, bytes] | None = None


def text_frame(text: str) -> bytes:
    """`text` as a server's WebSocket text frame (RFC 6455 section 5.2: final, unmasked), for
    `send_frame_now`. The fan-out writes one text to every local socket of a conversation in a
    row, so the last frame made is kept and made once for all of them (by identity, like
    chat.frames.shared_frame)."""
    global _last_frame
    last = _last_frame
    if last is not None and last[0] is text:
        return last[1]
    payload = text.encode("utf8")
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 65536:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    frame = header + payload
    _last_frame = (text, frame)
    return frame


def _as_is(value, *args, **kwargs):
    return value


def _plain_debug_arguments() -> None:
    """autobahn formats the arguments of its per-frame debug lines (`hltype`: the method's
    qualified name through `inspect`; `hlval`: terminal colours through click) before the logger
    sees that the line is not logged: on every frame written and every read, 2-3 % of a
    handshake's and of a delivery's CPU (docs/performance.md). Its WebSocket modules get
    functions that hand the value on as it is; a debug log still shows the values, uncoloured."""
    from autobahn.twisted import websocket as twisted_websocket
    from autobahn.websocket import protocol

    for module in (protocol, twisted_websocket):
        module.hltype = module.hlval = _as_is


def install() -> None:
    """Make daphne's server build its HTTP connections from the classes above and its WebSocket
    connections with their settings shared (daphne.server instantiates `HTTPFactory` and
    `WebSocketFactory` by those module-level names when it starts), make daphne's command line
    (which imports the application before it makes its server) run the server above, and spare
    autobahn's unlogged debug lines their formatting."""
    import daphne.cli
    import daphne.server

    daphne.server.HTTPFactory = CappedHTTPFactory
    daphne.server.WebSocketFactory = _websocket_factory_class()
    daphne.cli.CommandLineInterface.server_class = _server_class()
    _plain_debug_arguments()
