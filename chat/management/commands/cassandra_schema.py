"""`manage.py cassandra_schema`: create the message store's keyspace and tables in Cassandra.

Idempotent (run it before every start of a Cassandra-backed deployment). It reads the CASSANDRA_*
settings whatever CHAT_MESSAGE_STORE says, so the schema can be created before switching stores.
"""
from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.cassandra_models import replication_cql, sync_schema
from chat.store.cassandra import DRIVER_ERRORS, open_connection


class Command(BaseCommand):
    help = "Create the Cassandra keyspace (if missing) and create or extend the message store's tables."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--keyspace", default=settings.CASSANDRA_KEYSPACE, help="default: CASSANDRA_KEYSPACE")

    def handle(self, *args: Any, keyspace: str, **options: Any) -> None:
        connection = open_connection(alias="cassandra_schema", keyspace=keyspace)
        try:
            tables = sync_schema(connection, settings.CASSANDRA_REPLICATION)
        except DRIVER_ERRORS as exc:
            raise CommandError(f"Cassandra at {settings.CASSANDRA_HOSTS}: {type(exc).__name__}: {exc}") from exc
        finally:
            connection.unregister()
        self.stdout.write(
            f"keyspace {keyspace} (replication {replication_cql(settings.CASSANDRA_REPLICATION)} if created now): "
            f"tables {', '.join(tables)} in sync"
        )
