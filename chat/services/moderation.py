"""Moderation: edit, delete and report messages over the API, and the moderators' actions in the
admin (delete, resolve, dismiss, ban). Moderators' Django permissions are checked here, on the
write path, so no caller can skip them; every moderation action lands in the admin log."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import User
from chat import events, metrics
from chat.access import access_conversation
from chat.models import Ban, Conversation, Report
from chat.selectors import message_at, message_edits
from chat.services.attachments import attachments_doom_message
from chat.services.changes import change_record
from chat.services.conversations import ban_create
from chat.services.send import check_message_input, now_ms
from chat.store import Edit, Message, StoreError, get_message_store
from core.ratelimit import get_send_rate_limiter
from core.errors import NotAllowed, NotFound, RateLimited, StoreUnavailable, ValidationFailed

MAX_REPORT_REASON_LENGTH = 1000

# Moderators act in the Django admin; these permissions are checked here too, on the write path,
# so no other caller can skip them. Superusers have every permission.
MODERATE_MESSAGES_PERMISSION = "chat.change_conversation"
HANDLE_REPORTS_PERMISSION = "chat.change_report"
BAN_PERMISSION = "chat.add_ban"


@dataclass(frozen=True, slots=True)
class MessageChange:
    """A message as an edit or delete left it, and the change number it took (None: it changed
    nothing, e.g. a tombstone deleted again)."""

    message: Message
    change: int | None

    def as_dict(self) -> dict[str, Any]:
        return {**self.message.as_dict(), "change": self.change}


def can_moderate(user: User, permission: str) -> bool:
    return user.is_active and user.is_staff and user.has_perm(permission)


def _require_permission(user: User, *permissions: str) -> None:
    if not all(can_moderate(user, permission) for permission in permissions):
        raise NotAllowed()



def _message_was_deleted() -> ValidationFailed:
    return ValidationFailed({"non_field_errors": ["This message was deleted."]})


def _admin_log(actor: User, obj: Conversation | Report | Ban, action_flag: int, change_message: str) -> None:
    """Record a moderation action where moderators look for it: the admin log ("Recent actions")."""
    LogEntry.objects.log_actions(
        user_id=actor.pk, queryset=[obj], action_flag=action_flag, change_message=change_message, single_object=True
    )


def _username(user_id: uuid.UUID) -> str:
    return User.objects.filter(pk=user_id).values_list("username", flat=True).first() or str(user_id)


def message_edit(*, editor: User, conversation_id: object, seq: object, content: object) -> MessageChange:
    """Replace the content of your own message and stamp edited_at; emits message.updated.

    message_type, is_encrypted and metadata stay: an edit corrects what was said, it does not turn
    a text into a file. The new content obeys the same limits as a send of that type."""
    conversation, _ = access_conversation(user=editor, conversation_id=conversation_id)
    message = message_at(conversation=conversation, seq=seq)
    if message.sender_id != editor.pk:
        raise NotAllowed("Only the sender may edit a message.")
    if message.deleted:
        raise _message_was_deleted()
    body = check_message_input(
        content=content,
        message_type=message.message_type,
        is_encrypted=message.is_encrypted,
        metadata=message.metadata,
    )
    # An edit is broadcast to every member and keeps the content it replaces: it counts against
    # the sender's send rate, as a send and a reaction do.
    rate = get_send_rate_limiter().check(editor.pk)
    if not rate.allowed:
        metrics.send_rate_limited.labels(transport="rest").inc()
        raise RateLimited(rate)
    try:
        with transaction.atomic():
            # The change number first: it locks the conversation's row, so the changes of one
            # conversation are written one at a time, in their order.
            change = change_record(conversation_id=conversation.id, seq=message.seq, kind="updated")
            # Read again under the conversation's lock: the content this edit replaces, and a
            # concurrent delete (the rollback then gives the change number back).
            current = get_message_store().get(conversation.id, message.seq)
            if current is None:
                raise NotFound("No such message.")
            if current.deleted:
                raise _message_was_deleted()
            edited_at = now_ms()
            get_message_store().record_edit(
                Edit(
                    conversation_id=conversation.id,
                    seq=message.seq,
                    change=change.change,
                    content=current.content,
                    written_at=current.edited_at or current.sent_at,
                    replaced_at=edited_at,
                )
            )
            edited = get_message_store().edit(conversation.id, message.seq, body.content, edited_at)
            if edited is None or edited.deleted:  # deleted between the read and the edit
                raise _message_was_deleted()
            edited = replace(edited, attachments=message.attachments)  # an edit keeps them (the store does not hold them)
            events.message_updated(edited, change.change)
    except StoreError as exc:
        raise StoreUnavailable() from exc
    return MessageChange(edited, change.change)


def access_message_edits(
    *, user: User, conversation_id: object, seq: object, before_change: int | None = None, limit: int = 20
) -> tuple[list[Edit], bool]:
    """A message's edit history, newest first, and whether older versions follow: for its sender
    and for moderators (MODERATE_MESSAGES_PERMISSION), members of the conversation either way.
    Other members see the message as it is now, as everyone does: what someone corrected is theirs
    and the moderators' to see."""
    conversation, _ = access_conversation(user=user, conversation_id=conversation_id)
    message = message_at(conversation=conversation, seq=seq)
    if message.sender_id != user.pk and not can_moderate(user, MODERATE_MESSAGES_PERMISSION):
        raise NotAllowed("Only the sender or a moderator may read a message's edit history.")
    return message_edits(conversation=conversation, seq=message.seq, before_change=before_change, limit=limit)


def _delete_recorded(conversation_id: uuid.UUID, seq: int, last_change: int) -> bool:
    """Whether the committed change log (numbers up to last_change) holds the delete of seq."""
    after = 0
    while after < last_change:
        page = get_message_store().changes(conversation_id, after_change=after, before_change=last_change + 1, limit=200)
        if not page:
            return False
        if any(entry.kind == "deleted" and entry.seq == seq for entry in page):
            return True
        after = page[-1].change
    return False


def _tombstone(conversation: Conversation, message: Message) -> MessageChange:
    """Delete the message's content in the store (its edit history and reactions with it) and
    announce it, with the change number it takes (once: a tombstone stays one, and deleting it
    again takes no number)."""
    try:
        with transaction.atomic():
            change = change_record(conversation_id=conversation.id, seq=message.seq, kind="deleted")
            # Read again under the conversation's lock: a concurrent delete may have won.
            current = get_message_store().get(conversation.id, message.seq)
            if current is None:
                raise NotFound("No such message.")
            # The store and the relational database do not commit together: a process that dies
            # between writing the tombstone and committing its change number leaves a tombstone
            # that no change announces (its log entry is overwritten by the next change). The
            # next delete of it (the client's retry) records that delete, so every client hears
            # of it; only a delete already in the committed log makes this one a no-op.
            if current.deleted and _delete_recorded(conversation.id, message.seq, change.change - 1):
                transaction.set_rollback(True)  # nothing changed: give the number back
                return MessageChange(current, None)
            tombstone = current if current.deleted else get_message_store().tombstone(conversation.id, message.seq)
            attachments_doom_message(message_id=message.message_id)
            events.message_deleted(conversation.id, message.seq, change.change)
    except StoreError as exc:
        raise StoreUnavailable() from exc
    return MessageChange(tombstone, change.change)


def message_delete(*, actor: User, conversation_id: object, seq: object) -> MessageChange:
    """Delete a message over the API, leaving a tombstone; emits message.deleted.

    Allowed to its sender, the conversation's owner and admins, and staff moderators who are
    participants (elsewhere staff moderate in the admin: message_moderate_delete). Deleting someone
    else's message is a moderation action and goes to the admin log."""
    conversation, participant = access_conversation(user=actor, conversation_id=conversation_id)
    message = message_at(conversation=conversation, seq=seq)
    own = message.sender_id == actor.pk
    if not (own or participant.can_manage or can_moderate(actor, MODERATE_MESSAGES_PERMISSION)):
        raise NotAllowed("Only the sender, the conversation's owner or admins, or a moderator may delete it.")
    deleted = _tombstone(conversation, message)
    if not own and deleted.change is not None:
        _admin_log(
            actor,
            conversation,
            CHANGE,
            f"Deleted message {message.seq} by {_username(message.sender_id)} over the API "
            f"(as conversation {participant.role}).",
        )
    return deleted


def message_moderate_delete(*, moderator: User, conversation: Conversation, seq: int) -> MessageChange:
    """A moderator deletes a message of any conversation (the admin's message browser and report
    queue); emits message.deleted. The open reports about the message are resolved with it: what
    they reported is gone. Everything goes to the admin log."""
    _require_permission(moderator, MODERATE_MESSAGES_PERMISSION)
    message = message_at(conversation=conversation, seq=seq)
    deleted = _tombstone(conversation, message)
    if deleted.change is not None:
        _admin_log(moderator, conversation, CHANGE, f"Deleted message {seq} by {_username(message.sender_id)}.")
    for report in Report.objects.filter(conversation=conversation, seq=seq, status=Report.Status.OPEN):
        _report_close(moderator, report, Report.Status.RESOLVED, f"Resolved: message {seq} deleted.")
    return deleted


def message_report(*, reporter: User, conversation_id: object, seq: object, reason: object) -> tuple[Report, bool]:
    """Report someone else's message to the moderators; (report, created).

    Reporting a message again while your earlier report of it is open returns that report."""
    conversation, _ = access_conversation(user=reporter, conversation_id=conversation_id)
    reason = reason.strip() if isinstance(reason, str) else reason
    if not isinstance(reason, str) or not reason or len(reason) > MAX_REPORT_REASON_LENGTH:
        raise ValidationFailed(
            {"reason": [f"Must be a non-empty string of at most {MAX_REPORT_REASON_LENGTH} characters."]}
        )
    message = message_at(conversation=conversation, seq=seq)
    if message.deleted:
        raise _message_was_deleted()
    if message.sender_id == reporter.pk:
        raise ValidationFailed({"non_field_errors": ["You cannot report your own message."]})
    open_reports = Report.objects.filter(
        conversation=conversation, seq=message.seq, reporter=reporter, status=Report.Status.OPEN
    )
    existing = open_reports.first()
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            report = Report.objects.create(
                conversation=conversation,
                seq=message.seq,
                message_id=message.message_id,
                sender=User.objects.filter(pk=message.sender_id).first(),
                reported_content=message.content,
                reporter=reporter,
                reason=reason,
            )
    except IntegrityError:
        # The same report, submitted twice at the same moment.
        return open_reports.get(), False
    return report, True


def _report_close(moderator: User, report: Report, status: str, change_message: str) -> bool:
    # Conditional, so that two moderators handling one report log it once.
    closed = Report.objects.filter(pk=report.pk, status=Report.Status.OPEN).update(
        status=status, handled_by=moderator, handled_at=timezone.now()
    )
    if closed:
        report.refresh_from_db(fields=["status", "handled_by", "handled_at"])
        _admin_log(moderator, report, CHANGE, change_message)
    return bool(closed)


def report_resolve(*, moderator: User, report: Report) -> bool:
    """Close an open report as handled; False if it was no longer open."""
    _require_permission(moderator, HANDLE_REPORTS_PERMISSION)
    return _report_close(moderator, report, Report.Status.RESOLVED, "Resolved.")


def report_dismiss(*, moderator: User, report: Report) -> bool:
    """Close an open report as unfounded; False if it was no longer open."""
    _require_permission(moderator, HANDLE_REPORTS_PERMISSION)
    return _report_close(moderator, report, Report.Status.DISMISSED, "Dismissed.")


def report_delete_message(*, moderator: User, report: Report) -> MessageChange:
    """Delete the reported message; this report and the others about it are resolved."""
    _require_permission(moderator, HANDLE_REPORTS_PERMISSION, MODERATE_MESSAGES_PERMISSION)
    return message_moderate_delete(moderator=moderator, conversation=report.conversation, seq=report.seq)


def report_ban_sender(*, moderator: User, report: Report) -> Ban:
    """Ban the reported message's sender from its conversation (their sockets close with 4403) and
    resolve the report."""
    _require_permission(moderator, HANDLE_REPORTS_PERMISSION, BAN_PERMISSION)
    if report.sender is None:
        raise ValidationFailed({"sender": ["The sender's account no longer exists."]})
    with transaction.atomic():
        already_banned = Ban.objects.filter(conversation=report.conversation, user=report.sender).exists()
        ban = ban_create(
            actor=moderator,
            conversation=report.conversation,
            user=report.sender,
            reason=f"Report #{report.pk}: {report.reason}"[: Ban._meta.get_field("reason").max_length],
        )
        if not already_banned:
            _admin_log(moderator, ban, ADDITION, f"Banned {report.sender} from the conversation (report #{report.pk}).")
        _report_close(moderator, report, Report.Status.RESOLVED, f"Resolved: sender {report.sender} banned.")
    return ban
