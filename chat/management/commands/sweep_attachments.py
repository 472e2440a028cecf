"""`manage.py sweep_attachments`: delete the attachments nobody may read any more: uploads no
message carried within 24 hours, and those of deleted messages (kept while a report about the
message is open). The notification worker runs the same sweep every hour; this command is for a
cron job, or to catch up at once. Safe to run beside the worker: each attachment is claimed
before its objects are deleted."""
from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from chat.services.attachments import attachments_sweep


class Command(BaseCommand):
    help = "Delete expired unsent uploads and the attachments of deleted messages (bytes, thumbnails, rows)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch", type=int, default=500, help="attachments deleted per round (default 500)")

    def handle(self, *args: Any, batch: int, **options: Any) -> None:
        expired = deleted = 0
        while True:
            result = attachments_sweep(batch=batch)
            expired += result.expired
            deleted += result.deleted
            if result.deleted < batch:
                break
        self.stdout.write(f"{expired} unsent uploads expired; {deleted} attachments deleted.")
