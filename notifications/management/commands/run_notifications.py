"""`manage.py run_notifications`: the push notification worker. Run as many as you like."""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from prometheus_client import start_http_server

from notifications import conf
from notifications.backends import get_backend
from notifications.worker import Worker


class Command(BaseCommand):
    help = (
        "Deliver push notifications from the outbox. Safe to run as several processes. "
        "SIGTERM or SIGINT: finish the delivery in progress, hand back the rest, exit 0; "
        "a second signal exits at once (claims then expire after their lease)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="Deliver everything due now, then exit.")
        parser.add_argument(
            "--max-idle", type=float, default=None, metavar="SECONDS", help="Exit after this long with nothing to do."
        )
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=settings.CHAT_NOTIFICATION_METRICS_PORT,
            help="Serve this worker's Prometheus metrics on this port "
            "(default CHAT_NOTIFICATION_METRICS_PORT; 0: off).",
        )
        parser.add_argument(
            "--metrics-addr",
            default=settings.CHAT_NOTIFICATION_METRICS_ADDR,
            help="Address for --metrics-port (default CHAT_NOTIFICATION_METRICS_ADDR or 127.0.0.1).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            config = conf.load()
            backend = get_backend(config)
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc

        stop = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            stop.set()
            # Whoever signals twice means it: the next one ends the process the default way.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if options["metrics_port"]:
            start_http_server(options["metrics_port"], addr=options["metrics_addr"])

        worker = Worker(config=config, backend=backend, stop=stop)
        self.stdout.write(f"run_notifications {worker.worker_id}: backend {backend.name}, ready")
        self.stdout.flush()
        try:
            worker.run(once=options["once"], max_idle=options["max_idle"])
        finally:
            if settings.PROMETHEUS_MULTIPROC_DIR:
                from prometheus_client import multiprocess

                # Drops this process's live gauges from the aggregate /metrics.
                multiprocess.mark_process_dead(os.getpid())
        outcomes = ("expanded", "sent", "skipped", "failed", "dead", "released")
        summary = " ".join(f"{key}={worker.stats[key]}" for key in outcomes)
        self.stdout.write(f"run_notifications {worker.worker_id}: stopped; {summary}")
