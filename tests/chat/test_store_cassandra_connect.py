"""The Cassandra store while another thread is still opening the shared connection."""
import uuid

import pytest

from chat.store import StoreError


class SlowToConnect:
    """Stands for cqlengine's lazily connected connection: no session until `ready_after` reads."""

    def __init__(self, real, ready_after: int) -> None:
        self.real, self.reads_left, self.keyspace = real, ready_after, real.keyspace

    @property
    def session(self):
        self.reads_left -= 1
        return None if self.reads_left >= 0 else self.real.session


def test_waits_for_a_connection_another_thread_is_opening(cassandra_connection):
    from chat.store.cassandra import CassandraMessageStore

    store = CassandraMessageStore(connection=SlowToConnect(cassandra_connection, ready_after=3))
    assert store.get(uuid.uuid4(), 1) is None


def test_a_connection_that_never_comes_is_a_store_error(cassandra_connection, settings):
    from chat.store.cassandra import CassandraMessageStore

    settings.CASSANDRA_REQUEST_TIMEOUT = 0.1
    store = CassandraMessageStore(connection=SlowToConnect(cassandra_connection, ready_after=10**9))
    with pytest.raises(StoreError):
        store.get(uuid.uuid4(), 1)


EXIT_SCRIPT = """
import sys, uuid, weakref, django
django.setup()
from cassandra.io import libevreactor
from chat.store.cassandra import CassandraMessageStore, _shut_down_at_exit, open_connection

connection = open_connection(alias="exit_check", keyspace=sys.argv[1])
store = CassandraMessageStore(connection=connection)
assert store.get(uuid.uuid4(), 1) is None  # connected, one request made (its timer armed)
thread = libevreactor._global_loop._thread
_shut_down_at_exit(weakref.ref(connection.session.cluster))
print("io thread alive:", thread.is_alive())
"""


def test_the_driver_io_thread_ends_at_exit_instead_of_holding_the_exit_for_seconds(cassandra_connection):
    """The exit hook the store registers ends the driver's I/O thread at once (docs/performance.md:
    a worker that had used Cassandra took 5 s more to stop). In a process of its own: the driver's
    I/O loop is shared by every cluster of a process."""
    import os
    import subprocess
    import sys

    from django.conf import settings

    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatproject.settings",
           "DJANGO_SECRET_KEY": settings.SECRET_KEY, "CHAT_MESSAGE_STORE": "cassandra"}
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, cassandra_connection.keyspace],
        cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "io thread alive: False" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "could not be joined" not in done.stderr
