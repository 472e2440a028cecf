"""The delivery loop behind `manage.py run_notifications`.

Each round: claim due outbox entries and expand each into per-device deliveries (claimed by this
worker on creation, so they go out in the same round), claim due deliveries left from earlier
rounds (retries, or jobs of a worker that died), and deliver them concurrently, a bounded number
per host, each attempt under one deadline, hosts that keep failing left alone for a while. Who gets a
notification is decided twice: at expansion (participants but the sender, not muted, not having
read the message, and allowed by the one membership rule, chat.access) and again right before
each attempt, since a retry can come hours later.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db import DatabaseError, connections, transaction
from django.db.models import Count, Exists, Min, OuterRef
from django.utils import timezone

from accounts.models import User
from chat.access import allowed_participants
from chat.models import Conversation
from chat.selectors import message_of
from chat.services.attachments import attachments_sweep
from chat.services.send import idempotency_keys_purge
from chat.store import Message
from notifications import metrics, queue
from notifications.backends import DeliveryError, DestinationRefused, DeviceGone, PushBackend
from notifications.conf import NotificationConfig
from notifications.models import Delivery, Device, Job, OutboxEntry
from notifications.payloads import notification_payload

logger = logging.getLogger(__name__)

Status = Job.Status
GAUGE_INTERVAL_SECONDS = 15.0
PURGE_INTERVAL_SECONDS = 3600.0
PURGE_BATCH = 1000
PURGE_MAX_BATCHES = 10


@dataclass
class _RoundCache:
    """Reads shared by the deliveries of one round (many devices, one message)."""

    messages: dict[Any, Message | None] = field(default_factory=dict)
    conversations: dict[Any, Conversation] = field(default_factory=dict)
    sender_names: dict[Any, str] = field(default_factory=dict)


class HostBreaker:
    """Per-host circuit breaker of one worker process: after `threshold` consecutive failed
    attempts at a host, its deliveries are deferred for `cooldown` seconds; then attempts go out
    again, and one more failure opens it again at once. In memory: each worker learns on its own,
    which costs each at most `threshold` attempts per host per outage."""

    def __init__(self, *, threshold: int, cooldown: float, clock=time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self._failures: Counter[str] = Counter()
        self._open_until: dict[str, float] = {}

    def open_until(self, host: str | None) -> float | None:
        """When the host may be tried again (a monotonic time), or None if it may be now."""
        until = self._open_until.get(host) if host is not None else None
        return until if until is not None and self.clock() < until else None

    def succeeded(self, host: str | None) -> None:
        if host is not None:
            self._failures.pop(host, None)
            self._open_until.pop(host, None)

    def failed(self, host: str | None) -> bool:
        """Count a failure; True when it opens the breaker."""
        if host is None:
            return False
        self._failures[host] += 1
        if self._failures[host] >= self.threshold:
            self._open_until[host] = self.clock() + self.cooldown
            return True
        return False


class Worker:
    def __init__(
        self,
        *,
        config: NotificationConfig,
        backend: PushBackend,
        worker_id: str | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.stop = stop or threading.Event()
        self.stats: Counter[str] = Counter()
        self.breaker = HostBreaker(threshold=config.breaker_threshold, cooldown=config.breaker_cooldown)

    def run(self, *, once: bool = False, max_idle: float | None = None) -> None:
        """Deliver until stopped; with `once`, until nothing is due; with `max_idle`, until
        nothing was due for that many seconds."""
        idle_since = time.monotonic()
        next_gauges = next_purge = 0.0
        while not self.stop.is_set():
            try:
                if time.monotonic() >= next_gauges:
                    self.update_gauges()
                    next_gauges = time.monotonic() + GAUGE_INTERVAL_SECONDS
                if time.monotonic() >= next_purge:
                    self.purge_finished()
                    # The service's one background process also sweeps expired idempotency records
                    # and the attachments nobody may read any more (unsent for a day, or deleted).
                    idempotency_keys_purge()
                    attachments_sweep()
                    next_purge = time.monotonic() + PURGE_INTERVAL_SECONDS
                worked = self.run_once()
            except DatabaseError:
                # The database is down or failing over: claims already made expire with their
                # lease and are taken up again, by this worker or another, once it is back.
                logger.exception("notification worker %s: database error; retrying", self.worker_id)
                connections.close_all()
                worked = 0
            if worked:
                idle_since = time.monotonic()
                continue
            if once or (max_idle is not None and time.monotonic() - idle_since >= max_idle):
                break
            self.stop.wait(self.config.poll_interval)

    def run_once(self) -> int:
        """One round; the number of jobs claimed."""
        lease = self.config.lease_seconds
        entries = queue.claim(
            OutboxEntry.objects.all(), worker_id=self.worker_id, limit=self.config.batch_size, lease_seconds=lease
        )
        deliveries: list[Delivery] = []
        for index, entry in enumerate(entries):
            if self.stop.is_set():
                self._release(entries[index:])
                break
            deliveries += self._expand(entry)
        if not self.stop.is_set():
            deliveries += queue.claim(
                Delivery.objects.select_related("device", "outbox"),
                worker_id=self.worker_id,
                limit=self.config.batch_size,
                lease_seconds=lease,
            )
        self._deliver_all(deliveries)
        return len(entries) + len(deliveries)

    def _expand(self, entry: OutboxEntry) -> list[Delivery]:
        """Turn one outbox entry into deliveries claimed by this worker."""
        now = timezone.now()
        try:
            with transaction.atomic():
                if not queue.finish(entry, worker_id=self.worker_id, status=Status.DONE):
                    return []
                recipients = (
                    allowed_participants()
                    .filter(conversation_id=entry.conversation_id, muted=False, last_read_seq__lt=entry.seq)
                    .exclude(user_id=entry.sender_id)
                    .values("user_id")
                )
                devices = Device.objects.filter(user_id__in=recipients, kind__in=self.backend.device_kinds)
                # ignore_conflicts: an entry expanded again after a lost claim adds no duplicates.
                Delivery.objects.bulk_create(
                    [
                        Delivery(
                            outbox=entry,
                            device=device,
                            user_id=device.user_id,
                            claimed_by=self.worker_id,
                            claimed_until=entry.claimed_until,
                            attempts=1,
                            created_at=now,
                            next_attempt_at=now,
                        )
                        for device in devices
                    ],
                    ignore_conflicts=True,
                )
        except DatabaseError:
            raise
        except Exception as exc:
            logger.exception("expanding outbox entry %s failed", entry.pk)
            self._failed(entry, "outbox", f"{type(exc).__name__}: {exc}")
            return []
        self.stats["expanded"] += 1
        return list(
            Delivery.objects.select_related("device", "outbox").filter(
                outbox=entry, claimed_by=self.worker_id, claimed_until=entry.claimed_until
            )
        )

    def _deliver_all(self, deliveries: list[Delivery]) -> None:
        """Attempt `deliveries` concurrently: up to `concurrency` at once, at most
        `per_host_concurrency` of them to one host, none to a host whose breaker is open. The
        checks before an attempt and every write of a job's outcome run here, in the worker's
        thread; the pool's threads only talk to the backend (and close any database connection
        they opened), so one slow host holds up one thread for one deadline, nobody else."""
        cache = _RoundCache()
        waiting = deque(deliveries)
        in_flight: dict[Future, tuple[Delivery, str | None, float]] = {}
        per_host: Counter[str | None] = Counter()
        limit = self.config.per_host_concurrency
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="push") as pool:
            while waiting or in_flight:
                if self.stop.is_set():
                    self._release(list(waiting))
                    waiting.clear()
                held_back: deque[Delivery] = deque()
                while waiting and len(in_flight) < self.config.concurrency:
                    delivery = waiting.popleft()
                    # Start an attempt only if it can end within the lease: past it, another worker
                    # may claim the job and deliver it a second time.
                    lease_left = delivery.claimed_until - timezone.now()
                    if lease_left <= timedelta(seconds=self.config.timeout + 1):
                        self._release([delivery])
                        continue
                    host = self.backend.host_of(delivery)
                    reopens_at = self.breaker.open_until(host)
                    if reopens_at is not None:
                        self._defer(delivery, reopens_at)
                        continue
                    if host is not None and per_host[host] >= limit:
                        held_back.append(delivery)
                        continue
                    payload = self._prepare_attempt(delivery, cache)
                    if payload is None:
                        continue
                    per_host[host] += 1
                    in_flight[pool.submit(self._attempt, delivery, payload)] = (delivery, host, time.perf_counter())
                waiting = held_back + waiting
                if not in_flight:
                    # Everything left waits on a host limit with nothing in flight: cannot happen
                    # with a limit of at least 1, but never spin.
                    self._release(list(waiting))
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    delivery, host, started = in_flight.pop(future)
                    per_host[host] -= 1
                    metrics.attempt_duration.labels(backend=self.backend.name).observe(time.perf_counter() - started)
                    self._settle(delivery, host, future.exception())

    def _attempt(self, delivery: Delivery, payload: dict[str, Any]) -> None:
        """In a pool thread: hand the notification to the backend (bounded by its deadline)."""
        try:
            self.backend.send(delivery, payload)
        finally:
            connections.close_all()

    def _prepare_attempt(self, delivery: Delivery, cache: _RoundCache) -> dict[str, Any] | None:
        """The payload, or None when the delivery was closed here (skipped, or failed to prepare)."""
        try:
            skip_reason, payload = self._prepare(delivery, cache)
        except DatabaseError:
            raise
        except Exception as exc:
            self._attempt_failed(delivery, exc)
            return None
        if skip_reason is not None:
            queue.finish(delivery, worker_id=self.worker_id, status=Status.SKIPPED, note=f"skipped: {skip_reason}")
            metrics.skipped.labels(reason=skip_reason).inc()
            self.stats["skipped"] += 1
            return None
        return payload

    def _settle(self, delivery: Delivery, host: str | None, error: BaseException | None) -> None:
        """Record an attempt's outcome, and what it says about the host."""
        if error is None:
            self.breaker.succeeded(host)
            if queue.finish(delivery, worker_id=self.worker_id, status=Status.DONE):
                metrics.sent.labels(backend=self.backend.name).inc()
                metrics.delivery_latency.labels(backend=self.backend.name).observe(
                    (timezone.now() - delivery.outbox.created_at).total_seconds()
                )
                self.stats["sent"] += 1
            else:
                logger.warning("delivery %s was sent after its claim was lost; it may be sent twice", delivery.pk)
            return
        if isinstance(error, DeviceGone):
            # The subscription ended (browser unsubscribed, app removed): the device goes, and with
            # it this and its other pending deliveries. Nothing is lost: nobody is there.
            self.breaker.succeeded(host)  # the host answered
            logger.info("device %s is gone (%s); removing it", delivery.device_id, error)
            Device.objects.filter(pk=delivery.device_id, user_id=delivery.user_id).delete()
            metrics.skipped.labels(reason="device_gone").inc()
            self.stats["skipped"] += 1
            return
        if isinstance(error, DeliveryError) and not isinstance(error, DestinationRefused):
            # Refused destinations were never contacted; a bug here says nothing about the host.
            if self.breaker.failed(host):
                metrics.breaker_opened.inc()
                logger.warning(
                    "host %s failed %s attempts in a row; leaving it alone for %s s",
                    host, self.config.breaker_threshold, self.config.breaker_cooldown,
                )
        self._attempt_failed(delivery, error)

    def _defer(self, delivery: Delivery, until: float) -> None:
        at = timezone.now() + timedelta(seconds=max(0.0, until - time.monotonic()))
        count = queue.defer([delivery], worker_id=self.worker_id, until=at)
        metrics.deferred.inc(count)
        self.stats["deferred"] += count

    def _attempt_failed(self, delivery: Delivery, exc: BaseException) -> None:
        if isinstance(exc, DeliveryError):
            error = str(exc)
        else:
            # Not a refusal by the receiver but a fault here: keep the traceback in the log.
            logger.error("delivery %s failed unexpectedly", delivery.pk, exc_info=exc)
            error = f"{type(exc).__name__}: {exc}"
        self._failed(delivery, "delivery", error)

    def _prepare(self, delivery: Delivery, cache: _RoundCache) -> tuple[str | None, dict[str, Any]]:
        """(reason to skip, {}) or (None, payload), from what is true now, not at send time."""
        entry = delivery.outbox
        if delivery.device.user_id != delivery.user_id:
            return "device_reassigned", {}
        participant = (
            allowed_participants()
            .filter(conversation_id=entry.conversation_id, user_id=delivery.user_id)
            .values("muted", "last_read_seq")
            .first()
        )
        if participant is None:  # left, removed, banned or deactivated since the send
            return "no_access", {}
        if participant["muted"]:
            return "muted", {}
        if participant["last_read_seq"] >= entry.seq:
            return "read", {}
        if entry.message_id not in cache.messages:
            cache.messages[entry.message_id] = message_of(
                conversation_id=entry.conversation_id, seq=entry.seq, message_id=entry.message_id
            )
        message = cache.messages[entry.message_id]
        if message is None:
            # The outbox entry commits with the message: missing means the store is
            # lagging or failing, so this is worth retrying.
            raise DeliveryError(f"message {entry.message_id} not found in the message store")
        if message.deleted:
            return "deleted", {}
        if entry.conversation_id not in cache.conversations:
            cache.conversations[entry.conversation_id] = Conversation.objects.get(pk=entry.conversation_id)
        if entry.sender_id not in cache.sender_names:
            name = User.objects.filter(pk=entry.sender_id).values_list("username", flat=True).first()
            cache.sender_names[entry.sender_id] = name or "Someone"
        return None, notification_payload(
            message=message,
            conversation=cache.conversations[entry.conversation_id],
            sender_name=cache.sender_names[entry.sender_id],
        )

    def _failed(self, job: Job, queue_name: str, error: str) -> None:
        status = queue.fail(
            job,
            worker_id=self.worker_id,
            error=error,
            max_attempts=self.config.max_attempts,
            base=self.config.backoff_base,
            cap=self.config.backoff_max,
            jitter=self.config.backoff_jitter,
        )
        metrics.failed.labels(queue=queue_name).inc()
        self.stats["failed"] += 1
        if status == Status.PENDING:
            metrics.retried.labels(queue=queue_name).inc()
            logger.warning("%s job %s attempt %s failed, will retry: %s", queue_name, job.pk, job.attempts, error)
        elif status == Status.DEAD:
            metrics.dead_lettered.labels(queue=queue_name).inc()
            self.stats["dead"] += 1
            logger.error("%s job %s dead-lettered after %s attempts: %s", queue_name, job.pk, job.attempts, error)

    def _release(self, jobs: list[Job]) -> None:
        count = queue.release(jobs, worker_id=self.worker_id)
        metrics.released.inc(count)
        self.stats["released"] += count

    def update_gauges(self) -> None:
        now = timezone.now()
        for queue_name, model in (("outbox", OutboxEntry), ("delivery", Delivery)):
            pending = model.objects.filter(status=Status.PENDING).aggregate(count=Count("pk"), oldest=Min("created_at"))
            metrics.queue_depth.labels(queue=queue_name).set(pending["count"])
            oldest = pending["oldest"]
            metrics.oldest_pending_age.labels(queue=queue_name).set((now - oldest).total_seconds() if oldest else 0)
            metrics.dead_letters.labels(queue=queue_name).set(model.objects.filter(status=Status.DEAD).count())

    def purge_finished(self) -> int:
        """Delete sent and skipped deliveries past the retention, then the outbox entries left
        with no delivery. Dead and pending jobs are never purged. Bounded per call, so a backlog
        of old rows does not hold up deliveries; the next call continues."""
        if not self.config.retention_days:
            return 0
        cutoff = timezone.now() - timedelta(days=self.config.retention_days)
        deleted = 0
        for model, finished in (
            (Delivery, Delivery.objects.filter(status__in=[Status.DONE, Status.SKIPPED], finished_at__lt=cutoff)),
            (
                OutboxEntry,
                OutboxEntry.objects.filter(status=Status.DONE, finished_at__lt=cutoff).filter(
                    ~Exists(Delivery.objects.filter(outbox=OuterRef("pk")))
                ),
            ),
        ):
            for _ in range(PURGE_MAX_BATCHES):
                ids = list(finished.values_list("pk", flat=True)[:PURGE_BATCH])
                if not ids:
                    break
                deleted += model.objects.filter(pk__in=ids).delete()[0]
        return deleted
