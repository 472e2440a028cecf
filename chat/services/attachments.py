"""Attachments (SPEC 4.1, docs/attachments.md): every write of an attachment lives here.

- `attachment_create`: an upload becomes an unattached attachment: checked (chat.attachment_files),
  within the uploader's quota, its bytes and thumbnail stored, then its row committed.
- `attachments_attach`: the send path (chat.services.send) attaches the sender's own unattached
  uploads to the new message inside the send's transaction, so they are attached exactly when the
  message commits, and never to two messages.
- `attachments_doom_message`, `attachment_moderate_delete`: a deleted message's attachments, or
  one a moderator removes, stop answering at once; the sweeper deletes their objects.
- `attachments_sweep`: unattached uploads older than UNATTACHED_TTL and doomed attachments are
  deleted, objects first, then the row; a row is claimed before its objects are deleted, so two
  sweepers never delete the same objects, and a failed deletion is retried by a later sweep. A
  doomed attachment of a message with an open report is kept until the report is handled: the
  moderator must see what was reported. `manage.py sweep_attachments` and the notification
  worker's housekeeping call it.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import IO, Any

from django.conf import settings
from django.contrib.admin.models import CHANGE, LogEntry
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages
from django.db import transaction
from django.db.models import Exists, OuterRef, Q, Sum
from django.utils import timezone

from accounts.models import User
from chat.attachment_files import (
    INLINE_IMAGE_TYPES,
    SNIFF_BYTES,
    check_attachment_name,
    inspect_image,
    sha256_and_size,
    sniff_content_type,
)
from chat.models import Attachment, Conversation, Report
from chat.selectors import attachment_descriptor
from core.errors import NotAllowed, QuotaExceeded, RateLimited, StoreUnavailable, TooLarge, ValidationFailed
from core.ratelimit import limiter_for

logger = logging.getLogger(__name__)

MAX_ATTACHMENTS_PER_MESSAGE = 10
# Unsent uploads a user may hold at once: the byte quota alone would let tiny files pile up rows.
MAX_PENDING_UPLOADS = 100
UNATTACHED_TTL = timedelta(hours=24)
# A sweeper's claim on a row expires after this: a sweeper that died mid-way is taken over.
SWEEP_LEASE = timedelta(minutes=10)
# Who may remove an attachment in the admin (checked here too, on the write path).
DELETE_ATTACHMENT_PERMISSION = "chat.delete_attachment"
State = Attachment.State


def attachment_storage() -> Storage:
    return storages["attachments"]


def file_too_large() -> TooLarge:
    return TooLarge(f"Attachments are limited to {settings.CHAT_MAX_ATTACHMENT_BYTES} bytes.")


def quota_exceeded(remaining: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"Your attachments may add up to {settings.CHAT_ATTACHMENT_QUOTA_BYTES} bytes; {max(remaining, 0)} "
        "bytes are left. Uploads you have not sent are deleted after 24 hours."
    )


def storage_unavailable() -> StoreUnavailable:
    return StoreUnavailable("The file storage is unavailable; nothing was stored. Retry later.")


def check_upload_rate(*, user: User) -> None:
    """Uploads per user (CHAT_UPLOAD_RATE, across processes with Redis): RateLimited past it. The
    upload endpoint asks before it reads the body."""
    decision = limiter_for("upload", settings.CHAT_UPLOAD_RATE).check(user.pk)
    if not decision.allowed:
        raise RateLimited(decision, what="uploads")


def attachment_quota_left(*, user: User) -> int:
    """Bytes the user may still upload: the quota less what their live attachments hold."""
    used = Attachment.objects.filter(uploader_id=user.pk).exclude(state=State.DOOMED).aggregate(total=Sum("size"))
    return settings.CHAT_ATTACHMENT_QUOTA_BYTES - (used["total"] or 0)


def _check_room(uploader: User, size: int) -> None:
    if size > settings.CHAT_MAX_ATTACHMENT_BYTES:
        raise file_too_large()
    left = attachment_quota_left(user=uploader)
    if size > left:
        raise quota_exceeded(left)
    pending = Attachment.objects.filter(uploader_id=uploader.pk, state=State.UNATTACHED).count()
    if pending >= MAX_PENDING_UPLOADS:
        raise ValidationFailed(
            {"file": [f"You have {pending} uploads not sent in any message; send or wait for them to expire."]}
        )


def attachment_create(*, uploader: User, file: IO[bytes], name: object, size: int) -> Attachment:
    """Store an upload as the uploader's unattached attachment. `file` is the received bytes (a
    temporary file); nothing is stored unless every check passes."""
    name = check_attachment_name(name)
    if size == 0:
        raise ValidationFailed({"file": ["The file is empty."]})
    _check_room(uploader, size)
    original = file
    file.seek(0)
    content_type = sniff_content_type(file.read(SNIFF_BYTES), name)
    attachment = Attachment(uploader=uploader, name=name, content_type=content_type, created_at=timezone.now())
    thumbnail = None
    if content_type in INLINE_IMAGE_TYPES:
        facts = inspect_image(file, content_type)
        attachment.width, attachment.height = facts.width, facts.height
        thumbnail = facts.thumbnail
        if facts.cleaned is not None:
            file = facts.cleaned
    attachment.sha256, attachment.size = sha256_and_size(file)
    attachment.has_thumbnail = thumbnail is not None

    try:
        # The row first: if the process dies while the objects are written, the row still names
        # them and the sweeper deletes them with it a day later; nothing is left behind. Nobody
        # can ask for the attachment before this returns its id.
        with transaction.atomic():
            # One upload of a user at a time here: two parallel uploads cannot both fit the last
            # of the quota.
            User.objects.select_for_update().only("pk").get(pk=uploader.pk)
            _check_room(uploader, attachment.size)
            attachment.save(force_insert=True)
        try:
            storage = attachment_storage()
            storage.save(attachment.object_name, File(file))
            if thumbnail is not None:
                storage.save(attachment.thumbnail_object_name, ContentFile(thumbnail))
        except BaseException as exc:
            _delete_objects(attachment)
            Attachment.objects.filter(pk=attachment.pk).delete()
            if isinstance(exc, Exception):
                logger.error("attachment %s: the storage failed: %s", attachment.pk, exc)
                raise storage_unavailable() from exc
            raise
    finally:
        if file is not original:
            file.close()  # the re-saved image's temporary file
    return attachment


def check_attachment_ids(value: object) -> tuple[uuid.UUID, ...]:
    """A message's `attachments`: None, or a list of 1-10 distinct attachment ids."""
    if value is None:
        return ()
    problem = f"Must be a list of 1-{MAX_ATTACHMENTS_PER_MESSAGE} distinct attachment ids."
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_ATTACHMENTS_PER_MESSAGE:
        raise ValidationFailed({"attachments": [problem]})
    try:
        ids = tuple(item if isinstance(item, uuid.UUID) else uuid.UUID(item) for item in value)
    except (TypeError, ValueError, AttributeError):
        raise ValidationFailed({"attachments": [problem]}) from None
    if len(set(ids)) != len(ids):
        raise ValidationFailed({"attachments": [problem]})
    return ids


def _not_attachable() -> ValidationFailed:
    # One answer for someone else's upload, an unknown id and one already sent: no existence leak.
    return ValidationFailed({"attachments": ["Each must be one of your own uploads that no message carries yet."]})


def attachments_attach(
    *, sender_id: uuid.UUID, attachment_ids: Sequence[uuid.UUID], conversation_id: uuid.UUID, message_id: uuid.UUID,
    seq: int,
) -> tuple[dict[str, Any], ...]:
    """Inside the send's transaction: attach the sender's unattached uploads to the message, in
    the order given; their descriptors. ValidationFailed (the send rolls back) unless every one is
    the sender's and still unattached; the conditional update makes a concurrent send of the same
    upload, or the sweeper expiring it, lose cleanly."""
    rows = {
        row.pk: row
        for row in Attachment.objects.filter(pk__in=attachment_ids, uploader_id=sender_id, state=State.UNATTACHED)
    }
    if len(rows) != len(attachment_ids):
        raise _not_attachable()
    for position, attachment_id in enumerate(attachment_ids):
        attached = Attachment.objects.filter(pk=attachment_id, state=State.UNATTACHED).update(
            state=State.ATTACHED, conversation_id=conversation_id, message_id=message_id, seq=seq, position=position
        )
        if attached != 1:
            raise _not_attachable()
    return tuple(attachment_descriptor(rows[attachment_id]) for attachment_id in attachment_ids)


def attachments_doom_message(*, message_id: uuid.UUID) -> int:
    """A deleted message's attachments: nobody reads them from now on; the sweeper deletes them."""
    return Attachment.objects.filter(message_id=message_id, state=State.ATTACHED).update(state=State.DOOMED)


def attachment_moderate_delete(*, moderator: User, attachment: Attachment) -> None:
    """A moderator removes one attachment (the admin): it stops answering and leaves its message
    at once, its objects are deleted now (the sweeper retries if that fails), and the admin log
    records it. Connected clients see it gone on their next read of the message."""
    if not (moderator.is_active and moderator.is_staff and moderator.has_perm(DELETE_ATTACHMENT_PERMISSION)):
        raise NotAllowed()
    Attachment.objects.filter(pk=attachment.pk).exclude(state=State.DOOMED).update(state=State.DOOMED)
    LogEntry.objects.log_actions(
        user_id=moderator.pk, queryset=[attachment], action_flag=CHANGE,
        change_message=f"Deleted attachment {attachment.name!r} ({attachment.content_type}, {attachment.size} bytes).",
        single_object=True,
    )
    _purge(attachment.pk, timezone.now())


@dataclass(frozen=True, slots=True)
class SweepResult:
    expired: int  # unattached uploads doomed by this sweep
    deleted: int  # attachments whose objects and row this sweep deleted


def attachments_sweep(*, now: datetime | None = None, batch: int = 500) -> SweepResult:
    """Doom the unattached uploads past UNATTACHED_TTL and those of deleted conversations, then
    delete up to `batch` doomed attachments (objects, then row), except those of a message with an
    open report."""
    now = now or timezone.now()
    expired = Attachment.objects.filter(state=State.UNATTACHED, created_at__lt=now - UNATTACHED_TTL).update(
        state=State.DOOMED
    )
    # A deleted conversation takes its messages along; their attachments must not stay behind.
    Attachment.objects.filter(state=State.ATTACHED).filter(
        ~Exists(Conversation.objects.filter(pk=OuterRef("conversation_id")))
    ).update(state=State.DOOMED)
    reported = Report.objects.filter(
        conversation_id=OuterRef("conversation_id"), seq=OuterRef("seq"), status=Report.Status.OPEN
    )
    candidates = (
        Attachment.objects.filter(state=State.DOOMED)
        .filter(Q(sweep_claimed_at__isnull=True) | Q(sweep_claimed_at__lt=now - SWEEP_LEASE))
        .filter(~Exists(reported))
        .values_list("pk", flat=True)[:batch]
    )
    deleted = sum(_purge(attachment_id, now) for attachment_id in list(candidates))
    return SweepResult(expired=expired, deleted=deleted)


def _purge(attachment_id: uuid.UUID, now: datetime) -> bool:
    """Claim a doomed attachment, delete its objects, then its row; False if another sweeper has
    it or the storage failed (the claim then expires and a later sweep retries)."""
    claimed = (
        Attachment.objects.filter(pk=attachment_id, state=State.DOOMED)
        .filter(Q(sweep_claimed_at__isnull=True) | Q(sweep_claimed_at__lt=now - SWEEP_LEASE))
        .update(sweep_claimed_at=now)
    )
    if not claimed:
        return False
    attachment = Attachment.objects.get(pk=attachment_id)
    try:
        _delete_objects(attachment, raise_errors=True)
    except Exception:
        logger.exception("attachment %s: deleting its objects failed; a later sweep retries", attachment_id)
        return False
    Attachment.objects.filter(pk=attachment_id).delete()
    return True


def _delete_objects(attachment: Attachment, *, raise_errors: bool = False) -> None:
    storage = attachment_storage()
    for name in (attachment.object_name, attachment.thumbnail_object_name):
        try:
            storage.delete(name)  # deleting what is not there is no error, on disk or in S3
        except Exception:
            if raise_errors:
                raise
            logger.exception("attachment %s: deleting %s failed", attachment.pk, name)
