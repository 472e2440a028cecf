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
