from urllib.parse import parse_qs

from django.urls import path

from chat.consumers import ChatConsumer, UserStreamConsumer

_conversation_socket = ChatConsumer.as_asgi()
_user_stream = UserStreamConsumer.as_asgi()


def chat_socket(scope, receive, send):
    """ws/chat/: the conversation socket with a conversation_id (even an empty or bad one, which
    its handshake refuses), the user stream without. (Returns the consumer's coroutine rather than
    awaiting it in one of its own: a frame that would live as long as the connection.)"""
    query = parse_qs(scope.get("query_string", b"").decode("latin1"), keep_blank_values=True)
    application = _conversation_socket if "conversation_id" in query else _user_stream
    return application(scope, receive, send)


chat_socket._asgi_single_callable = True  # an ASGI 3 application, though not a coroutine function


websocket_urlpatterns = [path("ws/chat/", chat_socket)]
