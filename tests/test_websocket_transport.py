"""daphne's WebSocket connections share autobahn's settings through their class
(core.transport._websocket_factory_class) instead of a copy per connection; the handshakes and
frames over a real socket are the live tests' (tests/test_live_server.py and others)."""
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
