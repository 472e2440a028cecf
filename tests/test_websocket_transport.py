"""daphne's WebSocket connections share autobahn's settings through their class
(core.transport._websocket_factory_class) instead of a copy per connection, its shutdown reaches
every connection's application and it pauses accepting on demand (core.transport._server_class),
and autobahn's unlogged debug lines are not formatted (core.transport._plain_debug_arguments); the
handshakes, frames and the 1001 at shutdown over a real socket are the live tests'
(tests/test_live_server.py and others)."""
import asyncio

from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

import chatproject.asgi  # noqa: F401  (installs core.transport, as every server process does)


def test_a_connection_reads_the_settings_daphne_set_and_holds_none_of_its_own():
    import daphne.server

    factory = daphne.server.WebSocketFactory(None, server="test")
    factory.setProtocolOptions(autoPingTimeout=7, maxMessagePayloadSize=12345, allowNullOrigin=True)
    connection = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    connection.makeConnection(StringTransport())  # where autobahn copied the settings onto it
    assert (connection.autoPingTimeout, connection.maxMessagePayloadSize, connection.allowNullOrigin) == (7, 12345, True)
    assert not set(WebSocketServerProtocol.CONFIG_ATTRS) & set(vars(connection))
    # A setting that is a function is called as one (it decides on compression offers).
    assert connection.perMessageCompressionAccept([]) is None
    # Another call of setProtocolOptions reaches connections built after it.
    factory.setProtocolOptions(autoPingTimeout=9)
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2)).autoPingTimeout == 9
    assert connection.autoPingTimeout == 7


def test_a_connection_writes_and_reads_without_formatting_unlogged_debug_lines(monkeypatch):
    """autobahn's per-frame debug lines are not logged here; their arguments cost nothing."""
    import click
    import daphne.server

    styled = []
    monkeypatch.setattr(click, "style", lambda text, **kwargs: styled.append(text) or text)
    factory = daphne.server.WebSocketFactory(None, server="test")
    connection = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    connection.makeConnection(transport)
    styled.clear()
    connection.sendData(b"frame")
    connection.dataReceived(b"")
    assert transport.value().endswith(b"frame")
    assert styled == []


class ListeningPort:
    stopped = False

    def doRead(self):
        pass

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 8000)

    def stopListening(self):
        self.stopped = True


def test_the_shutdown_stops_listening_and_cancels_every_running_application(monkeypatch):
    import daphne.cli

    from core import transport

    monkeypatch.setattr(transport, "_shutting_down", False)  # (restored after: the flag is the process's)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        server = daphne.cli.CommandLineInterface.server_class(application=None, endpoints=["tcp:port=0"])
        port = ListeningPort()
        server.listen_success(port)
        running = [loop.create_task(asyncio.sleep(3600)) for _ in range(2)]
        ended = loop.create_future()
        ended.set_result(None)
        server.connections = {
            "websocket 1": {"application_instance": running[0]},
            # An HTTP keep-alive connection between requests: daphne removed its ended application.
            "keep-alive": {"disconnected": None},
            "http, just answered": {"application_instance": ended},
            "websocket 2": {"application_instance": running[1]},
        }
        assert not transport.shutting_down()
        shutdown_step = server.kill_all_applications()
        assert transport.shutting_down()  # what a socket's end is told (chat.consumers._presence_exit)
        outcome = []
        shutdown_step.addBoth(outcome.append)
        loop.run_until_complete(asyncio.sleep(0.01))
        assert port.stopped  # it takes no new connection while its applications end
        assert all(task.cancelled() for task in running)
        assert outcome == [None]  # the step ended, with no error: the shutdown goes on
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_a_paused_server_leaves_connections_in_the_listen_queue_and_resumes_with_at_most_the_free_slots_at_once():
    """chat.ws_auth.HandshakeAdmission pauses the server while every handshake slot is taken: the
    listening port leaves the reactor (connections wait in the kernel's queue, over a real
    socket here), and a resume takes at most as many as there are free slots in its first wake-up
    (Twisted would take its numberAccepts, 100 to start with)."""
    import socket

    import daphne.cli
    from twisted.internet import tcp
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()  # what the reactor does with the port: its readers
    accepted = []

    class Accepting(Factory):
        def buildProtocol(self, addr):
            accepted.append(addr)
            return Protocol()

    port = tcp.Port(0, Accepting(), interface="127.0.0.1", reactor=reactor)
    port.startListening()
    server = daphne.cli.CommandLineInterface.server_class(application=None, endpoints=["tcp:port=0"])
    server.listen_success(port)
    address = port.getHost()
    clients = [socket.create_connection((address.host, address.port)) for _ in range(5)]
    try:
        server.pause_accepting()
        assert port not in reactor.readers and accepted == []
        server.resume_accepting(at_most=2)
        assert port in reactor.readers
        port.doRead()  # the listening socket is readable: the reactor's call
        assert len(accepted) == 2
        port.doRead()
        assert len(accepted) == 5  # the rest once the port reads again, none lost
        # Once shutting down, a resume does not make it listen again.
        server.pause_accepting()
        port.stopListening()
        server.resume_accepting(at_most=10)
        assert port not in reactor.readers
    finally:
        for client in clients:
            client.close()
        for server_side in reactor.readers - {port}:  # the accepted connections
            server_side.socket.close()
        if not port.disconnecting:
            port.stopListening()
        reactor.advance(0)  # the port closes its socket


def test_a_text_frame_is_final_unmasked_and_sized_in_the_form_its_length_needs():
    from websockets.frames import Frame, Opcode
    from websockets.streams import StreamReader

    from core.transport import text_frame

    for size in (0, 125, 126, 65535, 65536, 70000):
        text = "é" * (size // 2) + "x" * (size % 2)  # two bytes each in UTF-8: the length is in bytes
        wire = text_frame(text)
        reader = StreamReader()
        reader.feed_data(wire)
        reader.feed_eof()
        parser = Frame.parse(reader.read_exact, mask=False, max_size=None)
        try:
            next(parser)
        except StopIteration as done:
            frame = done.value
        assert (frame.opcode, frame.fin, frame.data.decode()) == (Opcode.TEXT, True, text)
        assert len(wire) == len(frame.data) + (2 if size < 126 else 4 if size < 65536 else 10)
    text = "the same text"
    assert text_frame(text) is text_frame(text)  # made once for every socket it is written to


class OpenConnection:
    """One of daphne's WebSocket connections, open, on a real TCP connection (a socket pair; the
    reactor's part is a memory reactor, so nothing is written but by the calls here)."""

    def __init__(self):
        import socket

        from types import SimpleNamespace

        import daphne.server
        from twisted.internet.testing import MemoryReactorClock

        from core.transport import DirectWriteServer

        self.server_side, self.peer = socket.socketpair()
        self.reactor = MemoryReactorClock()
        factory = daphne.server.WebSocketFactory(None, server="test")
        self.connection = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))

        class Connection(DirectWriteServer):  # (the socket pair has no TCP address of its own)
            def getHost(self):
                return self.getPeer()

        listening_port = SimpleNamespace(_realPortNumber=1)
        self.transport = Connection(self.server_side, self.connection, ("127.0.0.1", 1), listening_port, 1, self.reactor)
        self.transport.connected = True
        self.connection.makeConnection(self.transport)
        self.connection.state = self.connection.STATE_OPEN  # as after the opening handshake
        self.peer.setblocking(False)

    def received(self) -> bytes:
        data = b""
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return data
            data += chunk

    def close(self):
        self.server_side.close()
        self.peer.close()


def test_a_write_goes_to_the_kernel_at_once_when_nothing_waits_and_behind_what_waits_otherwise():
    """core.transport's DirectWriteServer (a frame from send_frame_now, a protocol ping, anything
    written): no trip through the event loop for a connection whose buffer is empty, and never
    ahead of bytes still in the buffer (a frame the kernel could not take)."""
    from core.transport import text_frame

    socket = OpenConnection()
    try:
        first, second = text_frame("first"), text_frame("second")
        assert socket.connection.send_frame_now(first)
        assert socket.received() == first  # written by the call itself
        assert socket.transport not in socket.reactor.writers
        socket.connection.sendPing(b"p")
        assert socket.received() == b"\x89\x01p"  # a ping frame (opcode 9), written at once
        assert socket.transport not in socket.reactor.writers

        # Something waits in the transport's buffer (put there as Twisted's own write does, until
        # the reactor writes it): what comes next goes behind it.
        socket.transport._tempDataBuffer.append(b"waiting")
        socket.transport._tempDataLen += len(b"waiting")
        socket.transport.startWriting()
        assert socket.connection.send_frame_now(second)
        assert socket.received() == b""
        socket.transport.doWrite()  # the reactor's call once the socket is writable
        assert socket.received() == b"waiting" + second

        # A peer that does not read: the kernel takes what fits and the rest waits, in order.
        big = text_frame("x" * (4 << 20))
        assert socket.connection.send_frame_now(big)
        assert socket.transport in socket.reactor.writers
        assert socket.connection.send_frame_now(first)  # behind the rest of `big`
        got = socket.received()
        while socket.transport.dataBuffer[socket.transport.offset:] or socket.transport._tempDataBuffer:
            socket.transport.doWrite()
            got += socket.received()
        assert got == big + first

        # Not open (closing, or closed): nothing is written.
        socket.connection.state = socket.connection.STATE_CLOSING
        assert not socket.connection.send_frame_now(first)
        assert socket.received() == b""
    finally:
        socket.close()


def test_nothing_is_written_once_the_connection_is_closing_or_aborted():
    for close in ("loseConnection", "abortConnection"):
        socket = OpenConnection()
        try:
            getattr(socket.transport, close)()
            socket.transport.write(b"late")
            assert socket.received() == b""
        finally:
            socket.close()


def test_a_write_to_a_peer_that_is_gone_is_left_to_twisted_which_closes_the_connection():
    from twisted.internet import main

    socket = OpenConnection()
    try:
        socket.peer.close()
        socket.transport.write(b"x" * 100)  # no exception here: the send's error waits for the reactor
        assert socket.transport in socket.reactor.writers
        assert socket.transport.doWrite() is main.CONNECTION_LOST
    finally:
        socket.close()


def test_a_wake_up_takes_in_no_more_connections_than_there_is_room_for_among_those_without_a_request(monkeypatch):
    """At launch the listen queue may hold every client of a restarted server. A wake-up of the
    listening socket takes in no more connections than bring those whose request headers are not
    in yet to ARRIVALS_AT_ONCE, and always at least one (connections that send nothing cannot stop
    the server accepting); one stops counting once its headers are in, it closes, or after
    ARRIVAL_SECONDS. The rest wait in the kernel's queue, none lost (over a real socket here)."""
    import socket

    import daphne.cli
    from twisted.internet import tcp
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.failure import Failure

    from core import transport

    monkeypatch.setattr(transport, "ARRIVALS_AT_ONCE", 4)
    reactor = MemoryReactorClock()
    server = daphne.cli.CommandLineInterface.server_class(application=None, endpoints=["tcp:port=0"])
    server.clock = reactor
    server.connections = {}  # (daphne makes it when it runs)
    factory = transport.CappedHTTPFactory(server)
    factory.reactor = reactor  # (the connections' own idle timeouts)
    port = tcp.Port(0, factory, interface="127.0.0.1", reactor=reactor)
    port.startListening()
    server.listen_success(port)
    address = port.getHost()
    clients = [socket.create_connection((address.host, address.port)) for _ in range(12)]

    def accepted() -> dict:
        """The accepted connections, by the client's address."""
        return {connection.client: connection for connection in reactor.readers - {port}}

    def server_side(client) -> tcp.Server:
        return accepted()[client.getsockname()]

    def read(connection) -> None:  # what the reactor does when the connection is readable
        why = connection.doRead()
        if why:
            connection.connectionLost(Failure(why))

    try:
        port.doRead()  # Twisted's own first allowance is 100
        assert len(accepted()) == 4 and server.arrivals == 4
        assert {type(connection) for connection in accepted().values()} == {transport.DirectWriteServer}
        port.doRead()  # no room: one all the same
        assert len(accepted()) == 5 and server.arrivals == 5
        # Two send their request headers (the body comes later), one closes before its request:
        # they stop counting, and the next wake-up takes in as many as there is room for.
        for client in clients[:2]:
            client.sendall(b"POST /api/v1/messages/ HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
            read(server_side(client))
        closing = server_side(clients[2])
        clients[2].close()
        read(closing)
        assert server.arrivals == 2
        port.doRead()
        assert len(accepted()) == 4 + 2 and server.arrivals == 4  # (one of the 7 taken in closed)
        # Those that send nothing stop counting after ARRIVAL_SECONDS.
        reactor.advance(transport.ARRIVAL_SECONDS)
        assert server.arrivals == 0
        port.doRead()
        assert len(accepted()) == 6 + 4 and server.arrivals == 4
        port.doRead()
        assert len(accepted()) == 12 - 1  # every one taken in, none lost
    finally:
        for client in clients:
            client.close()
        for connection in accepted().values():
            connection.socket.close()
        if not port.disconnecting:
            port.stopListening()
        reactor.advance(0)
