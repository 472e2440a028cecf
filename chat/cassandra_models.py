"""The Cassandra schema of the message store, as cqlengine models (docs/cassandra.md).

The models only describe the tables: the store (chat.store.cassandra) reads and writes them with
prepared statements, which are much cheaper per call than cqlengine queries. `sync_schema` is the
one place that creates the schema: `manage.py cassandra_schema` and the contract tests both call it.
chat.models imports these classes so that django-cassandra-engine's `sync_cassandra` finds them too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from cassandra.cqlengine import columns, management
from cassandra.cqlengine.models import Model

if TYPE_CHECKING:
    from django_cassandra_engine.connection import CassandraConnection


class CassandraMessage(Model):
    """messages_by_conversation: history pages are clustering-key range scans of one partition.

    The partition is (conversation, bucket) with bucket = seq // bucket size, so a busy conversation
    spreads over many bounded partitions instead of one that grows forever."""

    __table_name__ = "messages_by_conversation"

    conversation_id = columns.UUID(partition_key=True)
    bucket = columns.BigInt(partition_key=True)
    seq = columns.BigInt(primary_key=True, clustering_order="ASC")
    message_id = columns.UUID(required=True)
    sender_id = columns.UUID(required=True)
    content = columns.Text(required=True)
    message_type = columns.Text(required=True)
    is_encrypted = columns.Boolean(required=True)
    # JSON text: Cassandra has no JSON column type, and a map<text,text> cannot nest.
    metadata = columns.Text(required=True)
    sent_at = columns.DateTime(required=True)
    edited_at = columns.DateTime()
    deleted = columns.Boolean(required=True)
    reply_to = columns.BigInt()


class CassandraConversationBucket(Model):
    """conversation_buckets: the buckets of a conversation that hold messages, newest first.

    The newest page reads the first row to know where to start; page walks list the buckets in
    their range, so a bucket with no messages costs nothing. One row per bucket (about one write
    per bucket size messages), so the partition stays tiny."""

    __table_name__ = "conversation_buckets"

    conversation_id = columns.UUID(partition_key=True)
    bucket = columns.BigInt(primary_key=True, clustering_order="DESC")


class CassandraChange(Model):
    """changes_by_conversation: the change log (edits, deletes, reactions), paged by change number.

    Partitioned like the messages, by (conversation, bucket) with bucket = change // bucket size.
    Change numbers are dense (every committed one has its entry), so a reader walks the buckets of
    its range in order and needs no bucket index."""

    __table_name__ = "changes_by_conversation"

    conversation_id = columns.UUID(partition_key=True)
    bucket = columns.BigInt(partition_key=True)
    change = columns.BigInt(primary_key=True, clustering_order="ASC")
    kind = columns.Text(required=True)
    seq = columns.BigInt(required=True)
    at = columns.DateTime(required=True)
    # JSON text, as message metadata.
    data = columns.Text(required=True)


class CassandraReply(Model):
    """replies_by_message: the threads, one row per reply, partitioned like the messages they reply
    to (bucket = reply_to // bucket size): a thread is a clustering range of one partition, and a
    page's reply counts are one GROUP BY query per bucket of the page."""

    __table_name__ = "replies_by_message"

    conversation_id = columns.UUID(partition_key=True)
    bucket = columns.BigInt(partition_key=True)
    reply_to = columns.BigInt(primary_key=True, clustering_order="ASC")
    seq = columns.BigInt(primary_key=True, clustering_order="ASC")


class CassandraReaction(Model):
    """reactions_by_message: one row per (message, emoji, user), partitioned like the messages
    (bucket = seq // bucket size), so the reactions of a page of messages are one GROUP BY query per
    bucket of the page (counts) plus one for the reader's own, never one query per message."""

    __table_name__ = "reactions_by_message"

    conversation_id = columns.UUID(partition_key=True)
    bucket = columns.BigInt(partition_key=True)
    seq = columns.BigInt(primary_key=True, clustering_order="ASC")
    emoji = columns.Text(primary_key=True, clustering_order="ASC")
    user_id = columns.UUID(primary_key=True, clustering_order="ASC")


class CassandraEdit(Model):
    """edits_by_message: a message's earlier versions (the content each edit replaced), newest
    first. One small partition per edited message, deleted whole with the message's content."""

    __table_name__ = "edits_by_message"

    conversation_id = columns.UUID(partition_key=True)
    seq = columns.BigInt(partition_key=True)
    change = columns.BigInt(primary_key=True, clustering_order="DESC")
    content = columns.Text(required=True)
    written_at = columns.DateTime(required=True)
    replaced_at = columns.DateTime(required=True)


# Messages are read by (conversation, seq) only; idempotency records live in the relational
# database, in the send's own transaction (chat.models.IdempotencyKey). Deployments that ran an
# earlier version may still have messages_by_id and idempotency_keys: nothing reads them, and an
# operator may drop them.
SCHEMA_MODELS: tuple[type[Model], ...] = (
    CassandraMessage,
    CassandraConversationBucket,
    CassandraChange,
    CassandraReply,
    CassandraReaction,
    CassandraEdit,
)


# Seconds a schema statement may take (the driver's own wait for schema agreement is 10 s).
SCHEMA_CHANGE_TIMEOUT = 30.0


def replication_cql(replication: dict[str, str | int]) -> str:
    """A CQL replication map literal, e.g. {'class': 'SimpleStrategy', 'replication_factor': 1}."""
    return "{" + ", ".join(f"'{name}': {value!r}" for name, value in replication.items()) + "}"


def sync_schema(connection: CassandraConnection, replication: dict[str, str | int]) -> list[str]:
    """Create the keyspace (if missing) and create or extend every table; safe to run again.

    Returns the names of the tables synced. An existing keyspace keeps its replication: changing
    replication on a live cluster is an operator's ALTER KEYSPACE plus a repair, not a side effect."""
    keyspace = connection.keyspace
    # A schema change waits until every node has the new schema: on a loaded three-node cluster
    # that took over the request timeout meant for sends (2 s). Only this connection's own
    # statements get the longer bound, and only while they run.
    profile = connection.session.cluster.profile_manager.default
    request_timeout, profile.request_timeout = profile.request_timeout, max(profile.request_timeout, SCHEMA_CHANGE_TIMEOUT)
    try:
        connection.session.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication_cql(replication)}"
        )
        for model in SCHEMA_MODELS:
            management.sync_table(model, keyspaces=[keyspace], connections=[connection.alias])
    finally:
        profile.request_timeout = request_timeout
    # The driver waits a few seconds for every node to agree on the schema after each change, then
    # goes on regardless. A node that has not got the new tables yet answers "keyspace does not
    # exist" (or INCOMPATIBLE_SCHEMA) until gossip catches up, and one killed meanwhile comes back
    # without them: done means every node has them.
    if not connection.session.cluster.control_connection.wait_for_schema_agreement(wait_time=SCHEMA_CHANGE_TIMEOUT):
        raise RuntimeError(f"the nodes did not agree on keyspace {keyspace}'s schema within {SCHEMA_CHANGE_TIMEOUT:.0f} s")
    return [model.__table_name__ for model in SCHEMA_MODELS]
