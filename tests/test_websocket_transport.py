"""daphne's WebSocket connections share autobahn's settings through their class
(core.transport._websocket_factory_class) instead of a copy per connection, and its shutdown
reaches every connection's application (core.transport._server_class), and autobahn's unlogged
debug lines are not formatted (core.transport._plain_debug_arguments); the handshakes, frames and
the 1001 at shutdown over a real socket are the live tests' (tests/test_live_server.py and others)."""
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

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 8000)

    def stopListening(self):
        self.stopped = True


def test_the_shutdown_stops_listening_and_cancels_every_running_application():
    import daphne.cli

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
        shutdown_step = server.kill_all_applications()
        outcome = []
        shutdown_step.addBoth(outcome.append)
        loop.run_until_complete(asyncio.sleep(0.01))
        assert port.stopped  # it takes no new connection while its applications end
        assert all(task.cancelled() for task in running)
        assert outcome == [None]  # the step ended, with no error: the shutdown goes on
    finally:
        asyncio.set_event_loop(None)
        loop.close()
