from django.apps import AppConfig


class DaphneRunserverConfig(AppConfig):
    """daphne as an app, for its `manage.py runserver` (the ASGI application, WebSockets included),
    without daphne's own AppConfig: the module that holds it imports daphne's server, which makes an
    event loop and installs Twisted's reactor in every process that loads Django. The launcher of
    `make run` loads Django and then forks its workers (scripts/serve.py), which would share that
    loop's epoll instance and wake-up pipe. daphne's server, and with it the reactor, is imported
    by daphne itself when it serves, and by its runserver command when that runs."""

    name = "daphne"
    verbose_name = "Daphne"
