import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
django_asgi_app = get_asgi_application()  # before importing anything that touches models

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from chat.routing import websocket_urlpatterns  # noqa: E402
from chat.ws_auth import websocket_stack  # noqa: E402

application = ProtocolTypeRouter(
    {"http": django_asgi_app, "websocket": websocket_stack(URLRouter(websocket_urlpatterns))}
)
