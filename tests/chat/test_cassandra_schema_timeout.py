"""Schema changes get a longer bound than sends (chat.cassandra_models.sync_schema): on a loaded
three-node cluster, waiting for every node to agree took over the 2 s meant for a send, and
`manage.py cassandra_schema` failed."""
import pytest

from chat import cassandra_models


def test_schema_statements_run_with_the_longer_timeout_which_is_then_restored(cassandra_connection, monkeypatch):
    profile = cassandra_connection.session.cluster.profile_manager.default
    before = profile.request_timeout
    seen = []
    monkeypatch.setattr(cassandra_models.management, "sync_table", lambda *a, **k: seen.append(profile.request_timeout))
    cassandra_models.sync_schema(cassandra_connection, {"class": "SimpleStrategy", "replication_factor": 1})
    assert seen == [cassandra_models.SCHEMA_CHANGE_TIMEOUT] * len(cassandra_models.SCHEMA_MODELS)
    assert before < cassandra_models.SCHEMA_CHANGE_TIMEOUT and profile.request_timeout == before


def test_a_schema_change_is_done_only_when_every_node_agrees(cassandra_connection, monkeypatch):
    # A node that has not got the new tables yet (gossip behind, or killed meanwhile and back
    # without them) answers "keyspace does not exist": the command must not report success first.
    control = cassandra_connection.session.cluster.control_connection
    waits = []

    def no_agreement(wait_time=None, **kwargs):
        waits.append(wait_time)
        return False

    monkeypatch.setattr(cassandra_models.management, "sync_table", lambda *a, **k: None)
    monkeypatch.setattr(control, "wait_for_schema_agreement", no_agreement)
    with pytest.raises(RuntimeError, match="did not agree"):
        cassandra_models.sync_schema(cassandra_connection, {"class": "SimpleStrategy", "replication_factor": 1})
    assert waits == [cassandra_models.SCHEMA_CHANGE_TIMEOUT]
