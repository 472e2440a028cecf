"""Schema changes get a longer bound than sends (chat.cassandra_models.sync_schema): on a loaded
three-node cluster, waiting for every node to agree took over the 2 s meant for a send, and
`manage.py cassandra_schema` failed."""
from chat import cassandra_models


def test_schema_statements_run_with_the_longer_timeout_which_is_then_restored(cassandra_connection, monkeypatch):
    profile = cassandra_connection.session.cluster.profile_manager.default
    before = profile.request_timeout
    seen = []
    monkeypatch.setattr(cassandra_models.management, "sync_table", lambda *a, **k: seen.append(profile.request_timeout))
    cassandra_models.sync_schema(cassandra_connection, {"class": "SimpleStrategy", "replication_factor": 1})
    assert seen == [cassandra_models.SCHEMA_CHANGE_TIMEOUT] * len(cassandra_models.SCHEMA_MODELS)
    assert before < cassandra_models.SCHEMA_CHANGE_TIMEOUT and profile.request_timeout == before
