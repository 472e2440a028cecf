"""Whether this process is shutting down.

When daphne stops (SIGTERM, SIGINT) it cancels every connection's application and waits for all of
them. A socket's clean-up would then tell Redis about everything the socket held, one round trip
after another: its fan-out subscriptions (one UNSUBSCRIBE each, taken in turn under the fan-out's
lock) and its presence entries with their offline announcements. With thousands of sockets that
kept a stopping worker alive for 7 s (docs/performance.md), and its clients waited for it to go.

A process that exits needs none of it: its Redis connections close with it, which ends its
subscriptions, and its presence entries expire as a crashed process's do (chat.presence), which
also spares the conversations an offline and an online announcement for every user who reconnects
to the next process a moment later.
"""
from __future__ import annotations

import sys

_stopping = False


def stopping() -> bool:
    return _stopping


def _stop() -> None:
    global _stopping
    _stopping = True


def install() -> None:
    """Learn of the shutdown before daphne cancels the connections. Only under a running Twisted
    reactor (daphne installs its own before it imports the application): importing one here would
    install Twisted's default reactor in a process that never serves."""
    if "twisted.internet.reactor" in sys.modules:
        from twisted.internet import reactor

        reactor.addSystemEventTrigger("before", "shutdown", _stop)
