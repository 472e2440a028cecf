"""The driver's connection pool fails over at once from a node whose connection closed (a crashed
node), instead of blocking the request for the driver's fixed 2 s wait (chat/store/cassandra.py).
The cluster test (tests/test_cassandra_cluster.py) shows the same end to end with a node killed."""
import threading
import time
import uuid
from types import SimpleNamespace

from cassandra.pool import HostConnection

import chat.store.cassandra  # noqa: F401  (installs the pool fix)


class FakeConnection:
    def __init__(self, *, closed: bool) -> None:
        self.is_closed = closed
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_request_id = 100
        self.orphaned_threshold_reached = False

    def get_request_id(self) -> int:
        return 1


def pool_with(*connections: FakeConnection) -> HostConnection:
    pool = HostConnection.__new__(HostConnection)
    pool.is_shutdown = False
    pool.host = SimpleNamespace(sharding_info=None)
    pool._session = SimpleNamespace(cluster=SimpleNamespace(shard_aware_options=SimpleNamespace(disable=True)))
    pool._connections = dict(enumerate(connections))
    pool._stream_available_condition = threading.Condition()
    return pool


def test_a_pool_whose_connections_all_closed_hands_one_back_at_once():
    closed = FakeConnection(closed=True)
    started = time.monotonic()
    connection, _ = pool_with(closed).borrow_connection(timeout=2.0)
    # The send on it fails at once, which marks the host down and moves the request on.
    assert connection is closed
    assert time.monotonic() - started < 0.5


def test_an_open_connection_is_still_preferred():
    closed, open_ = FakeConnection(closed=True), FakeConnection(closed=False)
    connection, _ = pool_with(closed, open_).borrow_connection(timeout=2.0)
    assert connection is open_ and open_.in_flight == 1


def test_inserts_and_reads_may_go_to_a_second_replica_conditional_updates_never(cassandra_connection, settings):
    """Speculative execution (settings.CASSANDRA_SPECULATIVE_DELAY) re-sends only idempotent
    statements: a paused or dead replica costs an insert or read that delay, never a duplicate
    conditional update."""
    from chat.store.cassandra import CassandraMessageStore, _Write

    store = CassandraMessageStore(connection=cassandra_connection)
    statements = store._prepared()
    conditional = {"edit", "tombstone"}
    for name, statement in vars(statements).items():
        assert statement.is_idempotent is (name not in conditional), name
    # A group commit's rows, batched, too.
    write = _Write(statements.insert_bucket, (uuid.uuid4(), 0), ("buckets",), 64)
    batch, _ = store._request([write, write])
    assert batch.is_idempotent is True
    profile = cassandra_connection.cluster.profile_manager.default
    assert profile.speculative_execution_policy.delay == settings.CASSANDRA_SPECULATIVE_DELAY
    assert profile.request_timeout == settings.CASSANDRA_REQUEST_TIMEOUT
