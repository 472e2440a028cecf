"""The `cassandra` message store (production). Same contract as chat.store.sql; schema and design
in chat/cassandra_models.py and docs/cassandra.md.

The connection comes from django-cassandra-engine (the `cassandra` database alias); the hot path
uses statements prepared once per store instance. Every driver failure becomes StoreError within
CASSANDRA_REQUEST_TIMEOUT, so a send fails fast with 503 and the driver keeps reconnecting behind.
"""
from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
import uuid
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone as dt_timezone
from typing import Any

from cassandra import ConsistencyLevel, DriverException, OperationTimedOut
from cassandra.cluster import NoHostAvailable, ResponseFuture, ResultSet, Session
from cassandra.connection import ConnectionException
from cassandra.cqlengine import CQLEngineException
from cassandra.pool import HostConnection
from cassandra.query import UNSET_VALUE, BatchStatement, BatchType, PreparedStatement, Statement
from django.conf import settings
from django_cassandra_engine.connection import CassandraConnection

from chat.store import Change, Edit, HistoryPage, Message, MessageStore, Reactions, StoreError

_driver_borrow_connection = HostConnection.borrow_connection


def _borrow_connection_failing_over_at_once(self: HostConnection, timeout: float, *args: Any, **kwargs: Any):
    """The driver's HostConnection.borrow_connection, minus its wait on a pool whose connections
    are all closed. A node that crashed closes its idle connection; the pool learns of it only when
    a request hands that connection back, and the driver's borrow first waits a fixed 2 s (not the
    request's timeout) for it to reopen, blocking the caller. The send then failed with a timeout
    although two replicas of three were alive. Without the wait, the borrow returns the closed
    connection, the send on it fails at once, the host is marked down and the request moves on to
    the next replica in its plan (tests/test_cassandra_driver_failover.py, and the cluster test)."""
    connections = list(self._connections.values())
    if connections and all(connection.is_closed for connection in connections):
        timeout = 0
    return _driver_borrow_connection(self, timeout, *args, **kwargs)


HostConnection.borrow_connection = _borrow_connection_failing_over_at_once

logger = logging.getLogger(__name__)

# Messages per partition of messages_by_conversation. A text message is at most 10 kB and
# typically well under 1 kB, so a full bucket is about 0.1-1 MB: far below the partition sizes
# where Cassandra compaction and repair suffer, while a 50-message page touches one or two
# partitions. Fixed for the life of a keyspace: bucket = seq // BUCKET_SIZE is how rows are found.
BUCKET_SIZE = 1000
DATABASE_ALIAS = "cassandra"

# Everything the driver raises for an unreachable, overloaded or misconfigured cluster.
DRIVER_ERRORS = (DriverException, NoHostAvailable, OperationTimedOut, ConnectionException, CQLEngineException, OSError)
# After a failed connection attempt, calls fail at once for this long instead of each trying to
# connect again: a burst of sends during an outage must not queue up behind connect timeouts.
_CONNECT_RETRY_SECONDS = 1.0
_MAX_SEQ = 2**63 - 1
_NO_REPLY = 0
# Bucket ids are read from conversation_buckets in chunks of this many rows.
_BUCKET_CHUNK = 100
# A history read over at most this many buckets reads each of them; over more it first asks
# conversation_buckets which of them hold messages, a read that pays only when it skips empty ones.
_DIRECT_BUCKETS = 2
# (conversation, bucket) pairs this process has already recorded in conversation_buckets.
_MARKED_BUCKETS_CACHED = 100_000
# A send's writes go in unlogged batches kept under Cassandra's default warning thresholds: 5 KiB
# of data (batch_size_warn_threshold; 50 KiB is refused) and 10 partitions
# (unlogged_batch_across_partitions_warn_threshold), with room for the size estimate's error.
_BATCH_MAX_BYTES = 4096
_BATCH_MAX_PARTITIONS = 10
# What a row weighs in Cassandra's measure of a batch besides its text: about 20 bytes per cell
# (timestamp, TTL, deletion time) and 29 per row on top of the values. A message row has 9 cells
# (about 265 bytes with its keys and ids); a thread row or a bucket marker about 30-40 bytes.
_MESSAGE_ROW_BYTES = 320
_SMALL_ROW_BYTES = 64
_MESSAGE_COLUMNS = (
    "conversation_id, seq, message_id, sender_id, content, message_type, is_encrypted, metadata, "
    "sent_at, edited_at, deleted, reply_to"
)


# The clusters whose exit hook is registered (one hook per cluster, however many stores use it).
_shut_down_at_exit_registered: "weakref.WeakSet" = weakref.WeakSet()


def _register_shut_down_at_exit(cluster) -> None:
    """Exit hooks run last registered first: this one runs before the driver's own."""
    if cluster not in _shut_down_at_exit_registered:
        _shut_down_at_exit_registered.add(cluster)
        atexit.register(_shut_down_at_exit, weakref.ref(cluster))


def _shut_down_at_exit(cluster_ref) -> None:
    """Close the cluster's connections and end the driver's I/O thread at process exit.

    The driver's own exit hook (cassandra.io.libevreactor) joins that thread for up to 5 s, and the
    thread sleeps until the last request's timer would have expired (an idle connection's
    heartbeat waits 30 s): the hook stops the watcher that would disarm the timer before it wakes
    the thread. A worker that had used Cassandra took 5 s more to stop (docs/performance.md).
    Waking the thread with the shutdown flag already set lets it disarm the timer and end. Only
    when no other cluster of the process still has a connection on that thread (tests hold
    several), and only if the driver's loop looks as expected: otherwise the driver's hook runs
    as it did."""
    cluster = cluster_ref()
    if cluster is None:
        return
    cluster.shutdown()
    libevreactor = sys.modules.get("cassandra.io.libevreactor")
    loop = getattr(libevreactor, "_global_loop", None)
    thread = getattr(loop, "_thread", None)
    if thread is None or not all(hasattr(loop, name) for name in ("_shutdown", "_live_conns", "notify")):
        return
    if not loop._live_conns:
        loop._shutdown = True
        loop.notify()
        thread.join(timeout=1.0)


def open_connection(alias: str, keyspace: str) -> CassandraConnection:
    """A django-cassandra-engine connection to `keyspace` with the project's CASSANDRA_* settings,
    for code that must not depend on the `cassandra` database alias (schema command, tests)."""
    return CassandraConnection(alias, **settings.CASSANDRA_DATABASE_FOR(keyspace))


def _utc(value: datetime | None) -> datetime | None:
    # The driver returns naive datetimes in UTC.
    return value.replace(tzinfo=dt_timezone.utc) if value is not None else None


def _to_message(row: dict[str, Any]) -> Message:
    return Message(
        message_id=row["message_id"],
        conversation_id=row["conversation_id"],
        seq=row["seq"],
        sender_id=row["sender_id"],
        content=row["content"],
        message_type=row["message_type"],
        is_encrypted=row["is_encrypted"],
        metadata=json.loads(row["metadata"]),
        sent_at=_utc(row["sent_at"]),
        edited_at=_utc(row["edited_at"]),
        deleted=row["deleted"],
        reply_to=row["reply_to"] or None,  # _NO_REPLY, or null in rows written before replies
    )


@dataclass(frozen=True)
class _Statements:
    insert_message: PreparedStatement
    insert_bucket: PreparedStatement
    get_message: PreparedStatement
    page_ascending: PreparedStatement
    page_descending: PreparedStatement
    buckets_ascending: PreparedStatement
    buckets_descending: PreparedStatement
    edit: PreparedStatement
    tombstone: PreparedStatement
    insert_change: PreparedStatement
    changes_page: PreparedStatement
    insert_reply: PreparedStatement
    reply_counts: PreparedStatement
    replies_page: PreparedStatement
    messages_in: PreparedStatement
    insert_reaction: PreparedStatement
    delete_reaction: PreparedStatement
    delete_reactions: PreparedStatement
    reaction_counts: PreparedStatement
    reactions_of: PreparedStatement
    insert_edit: PreparedStatement
    edits_page: PreparedStatement
    delete_edits: PreparedStatement


@dataclass(frozen=True, slots=True)
class _Write:
    """One row to write: its statement and values, its partition (table and key), and an estimate
    of its size as Cassandra measures a batch (_MESSAGE_ROW_BYTES)."""

    statement: PreparedStatement
    params: tuple[Any, ...]
    partition: tuple[Any, ...]
    size: int


def _text_bytes(text: str) -> int:
    """`text`'s UTF-8 length (encoded only when it is not ASCII)."""
    return len(text) if text.isascii() else len(text.encode())


class CassandraMessageStore(MessageStore):
    def __init__(
        self,
        *,
        connection: CassandraConnection | None = None,
        bucket_size: int = BUCKET_SIZE,
    ) -> None:
        """`connection` defaults to the `cassandra` database alias; `bucket_size` exists for tests
        (small buckets to cross partition boundaries)."""
        self._connection = connection
        self._bucket_size = bucket_size
        self._consistency = ConsistencyLevel.name_to_value[settings.CASSANDRA_CONSISTENCY]
        self._timeout = settings.CASSANDRA_REQUEST_TIMEOUT
        self._lock = threading.Lock()
        self._session: Session | None = None
        self._statements: _Statements | None = None
        self._connect_failed_at = float("-inf")
        self._marked_buckets: OrderedDict[tuple[uuid.UUID, int], None] = OrderedDict()

    # --- connection and statements -------------------------------------------------------------

    def _prepared(self) -> _Statements:
        statements = self._statements
        if statements is not None:
            return statements
        with self._lock:
            if self._statements is None:
                if time.monotonic() - self._connect_failed_at < _CONNECT_RETRY_SECONDS:
                    raise StoreError("Cassandra is unreachable (last connection attempt failed just now)")
                try:
                    connection = self._connection
                    if connection is None:
                        from django.db import connections

                        connection = connections[DATABASE_ALIAS].connection
                    session = self._wait_for_session(connection)
                    self._statements = self._prepare(session, connection.keyspace)
                    self._session = session
                    _register_shut_down_at_exit(session.cluster)
                except DRIVER_ERRORS as exc:
                    self._connect_failed_at = time.monotonic()
                    raise StoreError(f"Cassandra: {type(exc).__name__}: {exc}") from exc
            return self._statements

    def _wait_for_session(self, connection: CassandraConnection) -> Session:
        """cqlengine's lazy connect lets the first thread connect and hands every other thread a
        None session meanwhile (any thread may trigger it, e.g. Django's close_old_connections):
        wait, within the request timeout, for that connection to finish."""
        deadline = time.monotonic() + self._timeout
        session = connection.session
        while session is None and time.monotonic() < deadline:
            time.sleep(0.01)
            session = connection.session
        if session is None:
            raise StoreError("Cassandra: the connection is still being set up")
        return session

    def _prepare(self, session: Session, keyspace: str) -> _Statements:
        def prepare(cql: str, *, lwt: bool = False) -> PreparedStatement:
            statement = session.prepare(cql.replace("{ks}", keyspace))
            statement.consistency_level = self._consistency
            if lwt:
                statement.serial_consistency_level = ConsistencyLevel.LOCAL_SERIAL
            else:
                # Reads, and inserts of fixed values at a fixed key: running one twice changes
                # nothing, so the driver may send it to a second replica when the first is slow
                # or dead (speculative execution, settings.CASSANDRA_SPECULATIVE_DELAY). A
                # conditional update is not: its second run would report "not applied".
                statement.is_idempotent = True
            return statement

        by_conversation = "{ks}.messages_by_conversation"
        page = (
            f"SELECT {_MESSAGE_COLUMNS} FROM {by_conversation} WHERE conversation_id = ? AND bucket = ? "
            "AND seq > ? AND seq < ? ORDER BY seq {order} LIMIT ?"
        )
        buckets = (
            "SELECT bucket FROM {ks}.conversation_buckets WHERE conversation_id = ? AND bucket >= ? "
            "AND bucket <= ? ORDER BY bucket {order} LIMIT ?"
        )
        return _Statements(
            insert_message=prepare(
                f"INSERT INTO {by_conversation} (bucket, {_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            insert_bucket=prepare("INSERT INTO {ks}.conversation_buckets (conversation_id, bucket) VALUES (?, ?)"),
            get_message=prepare(
                f"SELECT {_MESSAGE_COLUMNS} FROM {by_conversation} WHERE conversation_id = ? AND bucket = ? AND seq = ?"
            ),
            page_ascending=prepare(page.replace("{order}", "ASC")),
            page_descending=prepare(page.replace("{order}", "DESC")),
            buckets_ascending=prepare(buckets.replace("{order}", "ASC")),
            buckets_descending=prepare(buckets.replace("{order}", "DESC")),
            # Conditional, so that an edit cannot bring back the content of a tombstone and neither
            # can create a row for an unknown seq (an UPDATE is an upsert in Cassandra).
            edit=prepare(
                f"UPDATE {by_conversation} SET content = ?, edited_at = ? "
                "WHERE conversation_id = ? AND bucket = ? AND seq = ? IF deleted = false",
                lwt=True,
            ),
            tombstone=prepare(
                f"UPDATE {by_conversation} SET content = '', metadata = '{{}}', deleted = true "
                "WHERE conversation_id = ? AND bucket = ? AND seq = ? IF EXISTS",
                lwt=True,
            ),
            insert_change=prepare(
                "INSERT INTO {ks}.changes_by_conversation (conversation_id, bucket, change, kind, seq, at, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)"
            ),
            changes_page=prepare(
                "SELECT change, kind, seq, at, data FROM {ks}.changes_by_conversation "
                "WHERE conversation_id = ? AND bucket = ? AND change > ? AND change < ? ORDER BY change ASC LIMIT ?"
            ),
            insert_reply=prepare("INSERT INTO {ks}.replies_by_message (conversation_id, bucket, reply_to, seq) VALUES (?, ?, ?, ?)"),
            reply_counts=prepare(
                "SELECT reply_to, COUNT(*) AS replies FROM {ks}.replies_by_message "
                "WHERE conversation_id = ? AND bucket = ? AND reply_to >= ? AND reply_to <= ? GROUP BY reply_to"
            ),
            replies_page=prepare(
                "SELECT seq FROM {ks}.replies_by_message "
                "WHERE conversation_id = ? AND bucket = ? AND reply_to = ? AND seq > ? AND seq < ? LIMIT ?"
            ),
            messages_in=prepare(
                f"SELECT {_MESSAGE_COLUMNS} FROM {by_conversation} WHERE conversation_id = ? AND bucket = ? AND seq IN ?"
            ),
            insert_reaction=prepare(
                "INSERT INTO {ks}.reactions_by_message (conversation_id, bucket, seq, emoji, user_id) VALUES (?, ?, ?, ?, ?)"
            ),
            delete_reaction=prepare(
                "DELETE FROM {ks}.reactions_by_message "
                "WHERE conversation_id = ? AND bucket = ? AND seq = ? AND emoji = ? AND user_id = ?"
            ),
            delete_reactions=prepare(
                "DELETE FROM {ks}.reactions_by_message WHERE conversation_id = ? AND bucket = ? AND seq = ?"
            ),
            reaction_counts=prepare(
                "SELECT seq, emoji, COUNT(*) AS reactions FROM {ks}.reactions_by_message "
                "WHERE conversation_id = ? AND bucket = ? AND seq >= ? AND seq <= ? GROUP BY seq, emoji"
            ),
            # The reader's own reactions: filtering within the slice the counts read anyway.
            reactions_of=prepare(
                "SELECT seq, emoji FROM {ks}.reactions_by_message "
                "WHERE conversation_id = ? AND bucket = ? AND seq >= ? AND seq <= ? AND user_id = ? ALLOW FILTERING"
            ),
            insert_edit=prepare(
                "INSERT INTO {ks}.edits_by_message (conversation_id, seq, change, content, written_at, replaced_at) "
                "VALUES (?, ?, ?, ?, ?, ?)"
            ),
            edits_page=prepare(
                "SELECT change, content, written_at, replaced_at FROM {ks}.edits_by_message "
                "WHERE conversation_id = ? AND seq = ? AND change < ? LIMIT ?"
            ),
            delete_edits=prepare("DELETE FROM {ks}.edits_by_message WHERE conversation_id = ? AND seq = ?"),
        )

    def _execute(self, statement: PreparedStatement, params: tuple[Any, ...]) -> ResultSet:
        try:
            return self._session.execute(statement, params, timeout=self._timeout)
        except DRIVER_ERRORS as exc:
            raise StoreError(f"Cassandra: {type(exc).__name__}: {exc}") from exc

    def _execute_all(
        self, requests: list[tuple[Statement, tuple[Any, ...] | None]], meanwhile: Callable[[], None] | None = None
    ) -> list[ResultSet]:
        """Run independent statements concurrently: the call costs the slowest one, not their sum;
        `meanwhile` runs while they are in flight."""
        try:
            futures: list[ResponseFuture] = [
                self._session.execute_async(statement, params, timeout=self._timeout) for statement, params in requests
            ]
        except DRIVER_ERRORS as exc:
            raise StoreError(f"Cassandra: {type(exc).__name__}: {exc}") from exc
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                # The caller's own work failed, and its transaction will give these messages' seqs
                # to the next sends: these writes land before that, not after their rows.
                for future in futures:
                    try:
                        future.result()
                    except DRIVER_ERRORS:
                        pass
                raise
        try:
            return [future.result() for future in futures]
        except DRIVER_ERRORS as exc:
            raise StoreError(f"Cassandra: {type(exc).__name__}: {exc}") from exc

    def _batched(self, writes: list[_Write]) -> list[tuple[Statement, tuple[Any, ...] | None]]:
        """`writes` as requests: runs of them in unlogged batches under the thresholds above, a run
        of one (a write too large to share a batch, say) as itself. A request costs the driver and
        the coordinator far more than a row in it does (docs/performance.md). An unlogged batch is
        no more atomic than the separate writes it replaces (each partition's rows apply or not on
        their own), which the send path allows for: a failed write fails every send of the call,
        and the seqs they took are taken again by the next sends, whose message rows overwrite
        these (a thread row left behind is skipped by its readers)."""
        requests: list[tuple[Statement, tuple[Any, ...] | None]] = []
        run: list[_Write] = []
        size = 0
        partitions: set[tuple[Any, ...]] = set()
        for write in writes:
            new_partition = write.partition not in partitions
            if run and (
                size + write.size > _BATCH_MAX_BYTES or (new_partition and len(partitions) == _BATCH_MAX_PARTITIONS)
            ):
                requests.append(self._request(run))
                run, size, partitions = [], 0, set()
            run.append(write)
            size += write.size
            partitions.add(write.partition)
        if run:
            requests.append(self._request(run))
        return requests

    def _request(self, run: list[_Write]) -> tuple[Statement, tuple[Any, ...] | None]:
        if len(run) == 1:
            return run[0].statement, run[0].params
        batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=self._consistency)
        # Upserts of fixed values, as each of its statements is (_prepare): the driver may send it
        # to a second replica when the first is slow or dead (speculative execution).
        batch.is_idempotent = True
        for write in run:
            batch.add(write.statement, write.params)
        return batch, None

    # --- messages --------------------------------------------------------------------------------

    def insert(self, *messages: Message, meanwhile: Callable[[], None] | None = None) -> None:
        # The writes go in as few requests as Cassandra takes without a warning, all in flight at
        # once: a group of sends costs the slowest request (_batched).
        statements = self._prepared()
        writes: list[_Write] = []
        markers = set()
        for message in messages:
            bucket = message.seq // self._bucket_size
            metadata = json.dumps(message.metadata, separators=(",", ":"), ensure_ascii=False)
            writes.append(
                _Write(
                    statements.insert_message,
                    (
                        bucket,
                        message.conversation_id,
                        message.seq,
                        message.message_id,
                        message.sender_id,
                        message.content,
                        message.message_type,
                        message.is_encrypted,
                        metadata,
                        message.sent_at,
                        # Unset, not null: a null would write a tombstone cell for every new message.
                        UNSET_VALUE if message.edited_at is None else message.edited_at,
                        message.deleted,
                        # 0 for none (seqs start at 1): written on every insert, so a send that takes the
                        # seq of one that did not commit replaces its reply_to too, without the
                        # tombstone cell a null would write.
                        message.reply_to or _NO_REPLY,
                    ),
                    ("messages", message.conversation_id, bucket),
                    _text_bytes(message.content) + _text_bytes(metadata) + _MESSAGE_ROW_BYTES,
                )
            )
            if message.reply_to is not None:
                reply_bucket = message.reply_to // self._bucket_size
                writes.append(
                    _Write(
                        statements.insert_reply,
                        (message.conversation_id, reply_bucket, message.reply_to, message.seq),
                        ("replies", message.conversation_id, reply_bucket),
                        _SMALL_ROW_BYTES,
                    )
                )
            markers.add((message.conversation_id, bucket))
        # Recorded when this process first writes to a bucket; re-recording one is harmless (an
        # upsert of the same row), forgetting one would hide its messages from the newest page.
        new_markers = [marker for marker in markers if marker not in self._marked_buckets]
        writes.extend(
            _Write(statements.insert_bucket, marker, ("buckets", marker[0]), _SMALL_ROW_BYTES) for marker in new_markers
        )
        self._execute_all(self._batched(writes), meanwhile)
        with self._lock:
            for marker in new_markers:
                self._marked_buckets[marker] = None
            while len(self._marked_buckets) > _MARKED_BUCKETS_CACHED:
                self._marked_buckets.popitem(last=False)

    def get(self, conversation_id: uuid.UUID, seq: int) -> Message | None:
        statements = self._prepared()
        row = self._execute(statements.get_message, (conversation_id, seq // self._bucket_size, seq)).one()
        return _to_message(row) if row else None

    def history(
        self,
        conversation_id: uuid.UUID,
        *,
        after_seq: int | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> HistoryPage:
        statements = self._prepared()
        forward = after_seq is not None
        low = after_seq if after_seq is not None else -1  # exclusive bounds
        high = before_seq if before_seq is not None else _MAX_SEQ
        if high - low <= 1:
            return HistoryPage()
        # One row more than asked for tells whether more exist in the paged direction.
        wanted = limit + 1
        page_statement = statements.page_ascending if forward else statements.page_descending
        rows: list[dict[str, Any]] = []
        first, last = (low + 1) // self._bucket_size, (high - 1) // self._bucket_size
        if last - first + 1 <= _DIRECT_BUCKETS:
            # A short range (a replay, a gap fill) reads its one or two buckets directly: asking
            # the index which of them hold anything would cost a read of its own.
            buckets: Iterable[int] = range(first, last + 1) if forward else range(last, first - 1, -1)
        else:
            statement = statements.buckets_ascending if forward else statements.buckets_descending
            buckets = self._buckets(statement, conversation_id, first, last)
        for bucket in buckets:
            rows.extend(self._execute(page_statement, (conversation_id, bucket, low, high, wanted - len(rows))))
            if len(rows) >= wanted:
                break
        messages = [_to_message(row) for row in rows[:limit]]
        if not forward:
            messages.reverse()
        return HistoryPage(messages=messages, has_more=len(rows) > limit)

    def _buckets(self, statement: PreparedStatement, conversation_id: uuid.UUID, first: int, last: int) -> Iterator[int]:
        """The conversation's buckets within [first, last], in the statement's order, read in chunks."""
        ascending = statement is self._prepared().buckets_ascending
        while first <= last:
            chunk = [row["bucket"] for row in self._execute(statement, (conversation_id, first, last, _BUCKET_CHUNK))]
            yield from chunk
            if len(chunk) < _BUCKET_CHUNK:
                return
            if ascending:
                first = chunk[-1] + 1
            else:
                last = chunk[-1] - 1

    def edit(self, conversation_id: uuid.UUID, seq: int, content: str, edited_at: datetime) -> Message | None:
        statements = self._prepared()
        self._execute(statements.edit, (content, edited_at, conversation_id, seq // self._bucket_size, seq))
        # Not applied means unknown (None) or a tombstone (returned unchanged): the read tells which.
        return self.get(conversation_id, seq)

    def tombstone(self, conversation_id: uuid.UUID, seq: int) -> Message | None:
        statements = self._prepared()
        bucket = seq // self._bucket_size
        if self._execute(statements.tombstone, (conversation_id, bucket, seq)).was_applied:
            # Its earlier versions and reactions go with the content.
            self._execute_all(
                [(statements.delete_edits, (conversation_id, seq)), (statements.delete_reactions, (conversation_id, bucket, seq))]
            )
        return self.get(conversation_id, seq)

    def _by_bucket(self, seqs: Sequence[int]) -> dict[int, list[int]]:
        grouped: dict[int, list[int]] = defaultdict(list)
        for seq in sorted(set(seqs)):
            grouped[seq // self._bucket_size].append(seq)
        return grouped

    # --- replies -----------------------------------------------------------------------------------

    def reply_counts(self, conversation_id: uuid.UUID, seqs: Sequence[int]) -> dict[int, int]:
        statements = self._prepared()
        results = self._execute_all(
            [
                (statements.reply_counts, (conversation_id, bucket, in_bucket[0], in_bucket[-1]))
                for bucket, in_bucket in self._by_bucket(seqs).items()
            ]
        )
        wanted = set(seqs)
        return {row["reply_to"]: row["replies"] for rows in results for row in rows if row["reply_to"] in wanted}

    def replies(
        self, conversation_id: uuid.UUID, seq: int, *, after_seq: int, before_seq: int, limit: int = 50
    ) -> HistoryPage:
        statements = self._prepared()
        bucket = seq // self._bucket_size
        messages: list[Message] = []
        while before_seq - after_seq > 1:
            wanted = limit - len(messages)
            rows = self._execute(statements.replies_page, (conversation_id, bucket, seq, after_seq, before_seq, wanted + 1))
            reply_seqs = [row["seq"] for row in rows]
            results = self._execute_all(
                [
                    (statements.messages_in, (conversation_id, message_bucket, in_bucket))
                    for message_bucket, in_bucket in self._by_bucket(reply_seqs[:wanted]).items()
                ]
            )
            # A thread row whose send did not commit names a seq that another message took since
            # (or nobody yet): that is no reply, and the page reads on in its place.
            messages.extend(
                sorted(
                    (message for rows in results for row in rows if (message := _to_message(row)).reply_to == seq),
                    key=lambda message: message.seq,
                )
            )
            if len(reply_seqs) <= wanted:
                return HistoryPage(messages=messages, has_more=False)
            if len(messages) == limit:
                return HistoryPage(messages=messages, has_more=True)
            after_seq = reply_seqs[wanted - 1]
        return HistoryPage(messages=messages, has_more=False)

    # --- reactions ---------------------------------------------------------------------------------

    def reaction_add(self, conversation_id: uuid.UUID, seq: int, emoji: str, user_id: uuid.UUID) -> None:
        statements = self._prepared()
        self._execute(statements.insert_reaction, (conversation_id, seq // self._bucket_size, seq, emoji, user_id))

    def reaction_remove(self, conversation_id: uuid.UUID, seq: int, emoji: str, user_id: uuid.UUID) -> None:
        statements = self._prepared()
        self._execute(statements.delete_reaction, (conversation_id, seq // self._bucket_size, seq, emoji, user_id))

    def reactions(
        self, conversation_id: uuid.UUID, seqs: Sequence[int], viewer_id: uuid.UUID | None
    ) -> dict[int, Reactions]:
        statements = self._prepared()
        requests = []
        for bucket, in_bucket in self._by_bucket(seqs).items():
            low, high = in_bucket[0], in_bucket[-1]
            requests.append((statements.reaction_counts, (conversation_id, bucket, low, high)))
            if viewer_id is not None:
                requests.append((statements.reactions_of, (conversation_id, bucket, low, high, viewer_id)))
        wanted = set(seqs)
        found: dict[int, Reactions] = {}
        mine: set[tuple[int, str]] = set()
        for rows in self._execute_all(requests):
            for row in rows:
                if row["seq"] not in wanted:
                    continue
                if "reactions" in row:
                    found.setdefault(row["seq"], {})[row["emoji"]] = {"count": row["reactions"], "me": False}
                else:
                    mine.add((row["seq"], row["emoji"]))
        for seq, emoji in mine:
            if emoji in found.get(seq, {}):
                found[seq][emoji]["me"] = True
        return {seq: dict(sorted(by_emoji.items())) for seq, by_emoji in found.items()}

    # --- edit history ------------------------------------------------------------------------------

    def record_edit(self, edit: Edit) -> None:
        statements = self._prepared()
        self._execute(
            statements.insert_edit,
            (edit.conversation_id, edit.seq, edit.change, edit.content, edit.written_at, edit.replaced_at),
        )

    def edits(self, conversation_id: uuid.UUID, seq: int, *, before_change: int, limit: int = 50) -> list[Edit]:
        statements = self._prepared()
        rows = self._execute(statements.edits_page, (conversation_id, seq, before_change, limit))
        return [
            Edit(
                conversation_id=conversation_id,
                seq=seq,
                change=row["change"],
                content=row["content"],
                written_at=_utc(row["written_at"]),
                replaced_at=_utc(row["replaced_at"]),
            )
            for row in rows
        ]

    # --- the change log ----------------------------------------------------------------------------

    def record_change(self, change: Change) -> None:
        statements = self._prepared()
        self._execute(
            statements.insert_change,
            (
                change.conversation_id,
                change.change // self._bucket_size,
                change.change,
                change.kind,
                change.seq,
                change.at,
                json.dumps(change.data, separators=(",", ":"), ensure_ascii=False),
            ),
        )

    def changes(
        self, conversation_id: uuid.UUID, *, after_change: int, before_change: int, limit: int = 50
    ) -> list[Change]:
        statements = self._prepared()
        found: list[Change] = []
        low, high = max(after_change, 0), before_change
        # Change numbers are dense: the buckets of the range are walked in order, no index needed.
        bucket, last_bucket = (low + 1) // self._bucket_size, (high - 1) // self._bucket_size
        while bucket <= last_bucket and len(found) < limit and high - low > 1:
            rows = self._execute(statements.changes_page, (conversation_id, bucket, low, high, limit - len(found)))
            found.extend(
                Change(
                    conversation_id=conversation_id,
                    change=row["change"],
                    kind=row["kind"],
                    seq=row["seq"],
                    at=_utc(row["at"]),
                    data=json.loads(row["data"]),
                )
                for row in rows
            )
            bucket += 1
        return found
