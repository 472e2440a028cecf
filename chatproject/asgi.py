"""The entry point daphne serves (`daphne chatproject.asgi:application`, and every worker of
`make run`): the application (chatproject/application.py), and daphne's transport made ours."""
import gc

from chatproject.application import application
from core import transport

# Request bodies are capped before they are buffered (core/bodylimit.py): in the app, and inside
# daphne, which otherwise buffers a whole body before the app sees any of it. Here and not in
# chatproject/application.py: installing imports daphne's server, which makes an event loop and
# installs Twisted's reactor on it, and workers forked after that would share the loop's epoll
# instance and wake-up pipe (scripts/serve.py forks its workers from a launcher that imported the
# application). Under daphne its server is imported already; elsewhere (a test) its imports are
# kept out of the garbage collector's walks like the application's.
gc.disable()
try:
    transport.install()
finally:
    gc.freeze()
    gc.enable()

__all__ = ["application"]
