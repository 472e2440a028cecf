"""The ASGI application, without the server it runs in: chatproject/asgi.py serves it with daphne.

Importing this module is most of a worker's start (Django, the app, its libraries: 1.5-2.5 s).
With several workers, `make run`'s launcher (scripts/serve.py) imports it once and forks the
workers from itself, so nothing here may start a thread or make an event loop (each worker makes
its own after the fork), and the launcher closes any database connection the system checks opened.
"""
import gc
import os
import sys

# No garbage collection while the worker imports: the collector would run about 400 times over the
# objects the imports create (0.3 s of a 2-2.5 s start), and those objects live as long as the
# process. A restart's clients wait for the start.
gc.disable()
try:
    from django.core.asgi import get_asgi_application

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
    django_asgi_app = get_asgi_application()  # before importing anything that touches models

    from django.conf import settings

    from chatproject.checks import refuse_to_start_on_errors

    # daphne runs no system checks of its own: a bad environment variable stops it here, naming
    # the variable.
    refuse_to_start_on_errors()

    # The event loop and the threads doing blocking work (ORM, Cassandra) share one GIL. A thread
    # whose database or Cassandra call returns must take the GIL back, and with CPython's default
    # 5 ms switch interval it waits up to 5 ms for a busy loop to let go: once per SQL statement
    # and per driver reply, while holding a transaction (docs/performance.md has the measurements).
    sys.setswitchinterval(settings.CHAT_GIL_SWITCH_INTERVAL)

    from chat.routing import websocket_application
    from chat.ws_auth import websocket_stack
    from core.bodylimit import BodyLimitMiddleware
    # What the server's transport needs of Twisted and daphne (their HTTP and WebSocket protocols),
    # imported here to be shared by forked workers; installing it is chatproject/asgi.py's part.
    from core import transport  # noqa: F401
finally:
    # A full collection of Python's garbage collector walks every tracked object: about 160,000 in
    # a worker, most of them the modules, classes and functions imported above, which live as long
    # as the process. It paused a worker for about 100 ms every half minute under load, the tail of
    # the fan-out's latency (docs/performance.md). Frozen, they are left out of every later
    # collection; what the sockets and requests create is collected as before. No collection
    # first: it would cost 0.15-0.2 s of the start to free the imports' cyclic leftovers (about
    # 2,600 objects, half a MiB once: tuples, functions and dicts left from building classes and
    # from logging's configuration; no file or socket).
    # In `finally`: a start that fails (a bad setting, in a test that imports this module) leaves
    # the collector on.
    gc.freeze()
    gc.enable()

_by_scope_type = {"http": BodyLimitMiddleware(django_asgi_app), "websocket": websocket_stack(websocket_application)}


def application(scope, receive, send):
    """HTTP to Django, WebSockets to the chat sockets. (Not channels' ProtocolTypeRouter, which
    awaits the application in a coroutine of its own: a frame per connection for its lifetime.)"""
    try:
        inner = _by_scope_type[scope["type"]]
    except KeyError:
        raise ValueError(f"No application for scope type {scope['type']!r}") from None
    return inner(scope, receive, send)


application._asgi_single_callable = True  # an ASGI 3 application, though not a coroutine function

