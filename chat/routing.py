from urllib.parse import parse_qs

from chat import metrics
from chat.consumers import ChatConsumer, UserStreamConsumer
from chat.ws_auth import deny

SOCKET_PATH = "/ws/chat/"


def websocket_application(scope, receive, send):
    """ws/chat/: the conversation socket with a conversation_id (even an empty or bad one, which
    its handshake refuses), the user stream without; any other path is refused (HTTP 403).

    Neither channels' URLRouter nor a consumer's as_asgi(): each awaits the consumer in a coroutine
    of its own (and the router in a copy of the scope), which would live as long as the connection.
    This returns the consumer's coroutine for the server to run."""
    path, root_path = scope["path"], scope.get("root_path", "").rstrip("/")
    if root_path and path.startswith(root_path + "/"):  # served under a prefix (daphne --root-path)
        path = path[len(root_path):]
    if path != SOCKET_PATH:
        metrics.websocket_connection_unauthorized.inc()
        return deny(scope, receive, send)
    query = parse_qs(scope.get("query_string", b"").decode("latin1"), keep_blank_values=True)
    consumer = ChatConsumer if "conversation_id" in query else UserStreamConsumer
    return consumer()(scope, receive, send)
