"""Claiming jobs under a lease, and finishing them. Safe with any number of worker processes.

A job is claimable when it is pending, due, and not under a live lease. A claim sets
`claimed_by` (this worker) and `claimed_until` (the lease). Every later write of the job is
conditional on `claimed_by` still being this worker, so a worker that lost its lease (stalled
past it; the job went to another worker) cannot overwrite the other worker's outcome. A worker
that dies holding a claim simply lets the lease run out; the job is then claimed again.
"""
from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import TypeVar

from django.db import connection, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from notifications.models import Job

J = TypeVar("J", bound=Job)

Status = Job.Status


def backoff_delay(attempts: int, *, base: float, cap: float, jitter: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: exponential, capped, jittered.

    The jitter scales the delay by a random factor in [1 - jitter, 1]: retries of many jobs that
    failed together (a receiver outage) spread out, and never come sooner than half the nominal
    delay with the default jitter of 0.5."""
    nominal = min(cap, base * 2 ** max(0, attempts - 1))
    return nominal * (1 - jitter * (rng or random).random())


def _claimable(now: datetime) -> Q:
    return Q(status=Status.PENDING, next_attempt_at__lte=now) & (
        Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    )


def claim(queryset: QuerySet[J], *, worker_id: str, limit: int, lease_seconds: float) -> list[J]:
    """Claim up to `limit` due jobs of `queryset`, oldest due first; the claimed jobs."""
    now = timezone.now()
    lease_until = now + timedelta(seconds=lease_seconds)
    claimable = _claimable(now)
    with transaction.atomic():
        candidates = queryset.filter(claimable).order_by("next_attempt_at", "pk")
        if connection.features.has_select_for_update_skip_locked:
            # PostgreSQL: concurrent workers skip each other's candidate rows instead of queueing
            # on their locks, so each gets a different batch.
            candidates = candidates.select_for_update(skip_locked=True, of=("self",))
        ids = list(candidates.values_list("pk", flat=True)[:limit])
        if not ids:
            return []
        # The UPDATE repeats the claimable condition: an atomic compare-and-set. Where rows are not
        # locked (SQLite), a row another worker claimed after our SELECT fails the condition here
        # and is not ours.
        queryset.model.objects.filter(claimable, pk__in=ids).update(
            claimed_by=worker_id, claimed_until=lease_until, attempts=F("attempts") + 1
        )
    return list(queryset.filter(pk__in=ids, claimed_by=worker_id, claimed_until=lease_until).order_by("pk"))


def _mine(job: Job, worker_id: str) -> QuerySet:
    return type(job).objects.filter(pk=job.pk, claimed_by=worker_id, status=Status.PENDING)


def finish(job: Job, *, worker_id: str, status: str, note: str = "") -> bool:
    """Close a claimed job as done or skipped; False when the claim was lost meanwhile."""
    fields: dict[str, object] = {
        "status": status, "claimed_by": "", "claimed_until": None, "finished_at": timezone.now()
    }
    if note:
        fields["last_error"] = note
    return bool(_mine(job, worker_id).update(**fields))


def fail(
    job: Job,
    *,
    worker_id: str,
    error: str,
    max_attempts: int,
    base: float,
    cap: float,
    jitter: float,
) -> str | None:
    """Record a failed attempt: reschedule with backoff, or dead-letter after the last attempt.

    Returns the job's new status (pending or dead), or None when the claim was lost meanwhile."""
    now = timezone.now()
    fields: dict[str, object] = {"claimed_by": "", "claimed_until": None, "last_error": error[:2000]}
    if job.attempts >= max_attempts:
        new_status = Status.DEAD
        fields.update(status=new_status, finished_at=now)
    else:
        new_status = Status.PENDING
        delay = backoff_delay(job.attempts, base=base, cap=cap, jitter=jitter)
        fields["next_attempt_at"] = now + timedelta(seconds=delay)
    if not _mine(job, worker_id).update(**fields):
        return None
    return new_status


def release(jobs: list[J], *, worker_id: str) -> int:
    """Hand claimed jobs back unattempted (shutdown, lease running low): due again at once, and
    the claim's attempt is given back."""
    if not jobs:
        return 0
    model = type(jobs[0])
    return model.objects.filter(
        pk__in=[job.pk for job in jobs], claimed_by=worker_id, status=Status.PENDING
    ).update(claimed_by="", claimed_until=None, attempts=F("attempts") - 1)


def defer(jobs: list[J], *, worker_id: str, until: datetime) -> int:
    """Hand claimed jobs back unattempted, due again at `until` (their host's circuit breaker is
    open): the claim's attempt is given back, so waiting out a host's outage uses up none."""
    if not jobs:
        return 0
    model = type(jobs[0])
    return model.objects.filter(
        pk__in=[job.pk for job in jobs], claimed_by=worker_id, status=Status.PENDING
    ).update(claimed_by="", claimed_until=None, attempts=F("attempts") - 1, next_attempt_at=until)


def requeue(queryset: QuerySet[J]) -> int:
    """Make dead or waiting jobs due now with a fresh set of attempts (the admin's re-queue).

    Jobs under a live claim are left alone: a worker is delivering them right now, and clearing
    its claim would let a second worker deliver them again. The last error stays for the record."""
    now = timezone.now()
    return queryset.filter(
        Q(status=Status.DEAD) | (Q(status=Status.PENDING) & (Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)))
    ).update(
        status=Status.PENDING, attempts=0, next_attempt_at=now, claimed_by="", claimed_until=None, finished_at=None
    )
