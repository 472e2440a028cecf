"""Moderation in the Django admin: conversations with their participants, a message browser per
conversation (read from the configured message store, so it works the same on Cassandra), bans,
the report queue, and the admin log where every moderation action lands.

Writes go through chat.services (conversations, moderation), which emits the live events and writes the admin log, and checks
the moderator's Django permissions again on the write path.
"""
from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.admin.models import LogEntry
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.text import Truncator
from django.views.decorators.http import require_POST

from accounts.models import User
from chat import selectors
from chat.services import conversations, moderation
from core.errors import ChatError, NotFound, StoreUnavailable
from chat.attachment_views import serve_attachment_object
from chat.attachment_files import THUMBNAIL_CONTENT_TYPE
from chat.models import Attachment, Ban, Conversation, Participant, Report
from chat.services.attachments import attachment_moderate_delete

# Messages per page of the message browser.
MESSAGE_PAGE_SIZE = 50
# Earlier versions of an edited message shown in the message browser.
EDITS_SHOWN = 20
# Characters of a message shown in lists; the full text is on the browser page.
PREVIEW_CHARS = 200


def _preview(content: str, limit: int = PREVIEW_CHARS) -> str:
    return Truncator(content).chars(limit)


def _int_param(request: HttpRequest, name: str) -> int | None:
    value = request.GET.get(name, "")
    # Bounded like the store's integer seq column: a longer number is no seq.
    return int(value) if value.isdigit() and len(value) < 19 else None


class ParticipantInline(admin.TabularInline):
    model = Participant
    extra = 0
    autocomplete_fields = ["user"]
    readonly_fields = ["joined_at", "last_read_seq"]


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "title", "last_seq", "last_activity_at", "created_at", "messages_link"]
    list_filter = ["kind"]
    search_fields = ["=id", "title", "participants__user__username"]
    readonly_fields = ["last_seq", "last_activity_at", "created_at", "direct_key"]
    inlines = [ParticipantInline]

    @admin.display(description="messages")
    def messages_link(self, conversation: Conversation) -> str:
        url = reverse("admin:chat_conversation_messages", args=[conversation.pk])
        return format_html('<a href="{}">browse</a>', url)

    def get_urls(self):
        return [
            path(
                "<path:object_id>/messages/",
                self.admin_site.admin_view(self.messages_view),
                name="chat_conversation_messages",
            ),
            path(
                "<path:object_id>/messages/<int:seq>/delete/",
                self.admin_site.admin_view(require_POST(self.message_delete_view)),
                name="chat_conversation_message_delete",
            ),
        ] + super().get_urls()

    def _conversation_or_404(self, request: HttpRequest, object_id: str) -> Conversation:
        conversation = self.get_object(request, unquote(object_id))
        if conversation is None:
            raise Http404("No such conversation.")
        return conversation

    def messages_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """One page of the conversation's messages in seq order, newest page first, with delete
        buttons for moderators who may change conversations."""
        conversation = self._conversation_or_404(request, object_id)
        if not self.has_view_or_change_permission(request, conversation):
            raise PermissionDenied
        after_seq, before_seq = _int_param(request, "after_seq"), _int_param(request, "before_seq")
        page_messages = []
        try:
            page_messages = selectors.message_history(
                conversation=conversation, after_seq=after_seq, before_seq=before_seq, limit=MESSAGE_PAGE_SIZE
            ).messages
        except StoreUnavailable:
            messages.error(request, "The message store is unavailable; try again shortly.")
        senders = User.objects.in_bulk({message.sender_id for message in page_messages})
        edit_history = self._edit_history(request, conversation, page_messages)
        open_reports: dict[int, int] = {}
        for seq in Report.objects.filter(
            conversation=conversation, seq__in=[m.seq for m in page_messages], status=Report.Status.OPEN
        ).values_list("seq", flat=True):
            open_reports[seq] = open_reports.get(seq, 0) + 1
        browser_url = reverse("admin:chat_conversation_messages", args=[conversation.pk])
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"Messages of {conversation}",
            "conversation": conversation,
            "rows": [
                {
                    "message": message,
                    "sender": senders.get(message.sender_id),
                    "open_reports": open_reports.get(message.seq, 0),
                    "attachments": [_admin_links(descriptor) for descriptor in message.attachments],
                    "edits": edit_history.get(message.seq, []),
                }
                for message in page_messages
            ],
            # Seqs start at 1 and end at the conversation's counter: the edges tell what lies beyond.
            "older_url": f"{browser_url}?before_seq={page_messages[0].seq}"
            if page_messages and page_messages[0].seq > 1
            else None,
            "newer_url": f"{browser_url}?after_seq={page_messages[-1].seq}"
            if page_messages and page_messages[-1].seq < conversation.last_seq
            else None,
            "newest_url": browser_url,
            "can_delete": self.has_change_permission(request, conversation),
            "current_url": request.get_full_path(),
            "reports_url": reverse("admin:chat_report_changelist") + f"?conversation__id__exact={conversation.pk}",
        }
        return TemplateResponse(request, "admin/chat/conversation/messages.html", context)

    def _edit_history(self, request: HttpRequest, conversation: Conversation, page_messages) -> dict[int, list]:
        """The earlier versions of the page's edited messages, newest first, for moderators (the
        permission that lets them read edit history over the API too); a message's latest
        EDITS_SHOWN versions, the rest are rare enough to leave out."""
        if not moderation.can_moderate(request.user, moderation.MODERATE_MESSAGES_PERMISSION):
            return {}
        history: dict[int, list] = {}
        try:
            for message in page_messages:
                if message.edited_at is not None and not message.deleted:
                    history[message.seq], _ = selectors.message_edits(conversation=conversation, seq=message.seq, limit=EDITS_SHOWN)
        except StoreUnavailable:
            messages.error(request, "The message store is unavailable: edit history not shown.")
        return history

    def message_delete_view(self, request: HttpRequest, object_id: str, seq: int) -> HttpResponse:
        conversation = self._conversation_or_404(request, object_id)
        if not self.has_change_permission(request, conversation):
            raise PermissionDenied
        try:
            moderation.message_moderate_delete(moderator=request.user, conversation=conversation, seq=seq)
        except ChatError as exc:
            messages.error(request, f"Message {seq} was not deleted: {exc.detail}")
        else:
            messages.success(request, f"Message {seq} deleted; connected clients were told.")
        back = request.POST.get("next", "")
        if not url_has_allowed_host_and_scheme(
            back, allowed_hosts={request.get_host()}, require_https=request.is_secure()
        ):
            back = reverse("admin:chat_conversation_messages", args=[conversation.pk])
        return HttpResponseRedirect(back)


def _admin_links(descriptor: dict) -> dict:
    """An attachment as the message browser shows it: its descriptor and the admin's own URLs (a
    moderator need not be a participant, so the API's URLs would answer 403)."""
    attachment_id = descriptor["attachment_id"]
    return {
        **descriptor,
        "admin_thumbnail_url": reverse("admin:chat_attachment_thumbnail", args=[attachment_id])
        if descriptor["thumbnail_url"] else None,
        "admin_file_url": reverse("admin:chat_attachment_file", args=[attachment_id]),
        "admin_delete_url": reverse("admin:chat_attachment_delete", args=[attachment_id]),
    }


def _thumbnail_html(attachment: Attachment) -> str:
    file_url = reverse("admin:chat_attachment_file", args=[attachment.pk])
    if not attachment.has_thumbnail:
        return format_html('<a href="{}">{}</a>', file_url, attachment.name)
    return format_html(
        '<a href="{}"><img src="{}" alt="{}" style="max-width: 160px; max-height: 160px"></a>',
        file_url, reverse("admin:chat_attachment_thumbnail", args=[attachment.pk]), attachment.name,
    )


@admin.register(Attachment)
class AttachmentAdmin(admin.ModelAdmin):
    """Uploaded files: what they are, where they were sent, a thumbnail for images. A moderator
    deletes one here (or from the message browser): it leaves its message at once and its bytes
    are deleted (chat.services.attachments.attachment_moderate_delete, written to the admin log)."""

    list_display = ["preview", "name", "content_type", "size", "state", "uploader", "conversation_id", "seq",
                    "created_at"]
    list_filter = ["state"]
    list_select_related = ["uploader"]
    search_fields = ["=id", "=message_id", "=conversation_id", "uploader__username", "name"]
    ordering = ["-created_at"]
    fields = ["preview", "name", "content_type", "size", "sha256", "width", "height", "state", "uploader",
              "conversation_id", "seq", "message_id", "created_at"]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # uploads come from people, over the API

    def has_change_permission(self, request: HttpRequest, obj: Attachment | None = None) -> bool:
        return False

    @admin.display(description="preview")
    def preview(self, attachment: Attachment) -> str:
        return _thumbnail_html(attachment)

    # The service writes the admin log entry of a deletion (with what was deleted); not twice.
    def log_deletion(self, request: HttpRequest, obj: Attachment, object_repr: str) -> None:
        return None

    def log_deletions(self, request: HttpRequest, queryset: QuerySet[Attachment]) -> None:
        return None

    def delete_model(self, request: HttpRequest, obj: Attachment) -> None:
        attachment_moderate_delete(moderator=request.user, attachment=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Attachment]) -> None:
        for attachment in queryset:
            attachment_moderate_delete(moderator=request.user, attachment=attachment)

    def get_urls(self):
        return [
            path("<path:object_id>/file/", self.admin_site.admin_view(self.file_view), name="chat_attachment_file"),
            path(
                "<path:object_id>/thumbnail/",
                self.admin_site.admin_view(self.thumbnail_view),
                name="chat_attachment_thumbnail",
            ),
        ] + super().get_urls()

    def _viewable(self, request: HttpRequest, object_id: str) -> Attachment:
        attachment = self.get_object(request, unquote(object_id))
        if attachment is None:
            raise Http404("No such attachment.")
        if not self.has_view_permission(request, attachment):
            raise PermissionDenied
        return attachment

    def file_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        # Always a download here: a moderator's browser never renders what it is judging.
        attachment = self._viewable(request, object_id)
        return serve_attachment_object(request, attachment.object_name, attachment.content_type, attachment.name,
                                       inline=False)

    def thumbnail_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        attachment = self._viewable(request, object_id)
        if not attachment.has_thumbnail:
            raise Http404("No thumbnail.")
        return serve_attachment_object(request, attachment.thumbnail_object_name, THUMBNAIL_CONTENT_TYPE,
                                       f"{attachment.pk}-thumbnail.webp", inline=True)


@admin.register(Ban)
class BanAdmin(admin.ModelAdmin):
    list_display = ["user", "conversation", "banned_by", "reason", "created_at"]
    search_fields = ["user__username", "=conversation__id"]
    autocomplete_fields = ["user", "conversation"]
    readonly_fields = ["banned_by", "created_at"]

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        # Through the service, so the banned user's open sockets close at once.
        banned = conversations.ban_create(actor=request.user, conversation=obj.conversation, user=obj.user, reason=obj.reason)
        obj.pk = banned.pk


@admin.register(Report)
class ReportAdmin(admin.ModelAdmin):
    """The report queue. Reports come from participants over the API; here they are handled with
    the actions, each of which resolves the report and is written to the admin log."""

    list_display = [
        "id", "created_at", "status", "conversation", "seq", "reported_message", "sender", "reporter", "reason"
    ]
    list_display_links = ["id", "reported_message"]
    list_filter = ["status"]
    list_select_related = ["conversation", "sender", "reporter"]
    search_fields = ["reason", "sender__username", "reporter__username", "=conversation__id"]
    ordering = ["-created_at"]
    actions = ["resolve", "dismiss", "delete_message", "ban_sender"]
    fields = [
        "status", "conversation", "seq", "message_id", "sender", "reported_content", "reported_attachments",
        "message_now", "reporter",
        "reason", "created_at", "handled_by", "handled_at",
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: Report | None = None) -> list[str]:
        return self.fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Report | None = None) -> bool:
        return False  # a handled report is part of the moderation record

    def has_delete_message_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perms([moderation.HANDLE_REPORTS_PERMISSION, moderation.MODERATE_MESSAGES_PERMISSION])

    def has_ban_sender_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perms([moderation.HANDLE_REPORTS_PERMISSION, moderation.BAN_PERMISSION])

    @admin.display(description="reported message")
    def reported_message(self, report: Report) -> str:
        return _preview(report.reported_content)

    @admin.display(description="attachments")
    def reported_attachments(self, report: Report) -> str:
        """The message's attachments, also after the message was deleted: they are kept while a
        report about it is open."""
        attachments = Attachment.objects.filter(message_id=report.message_id).order_by("position")
        return format_html_join(" ", "{}", ((_thumbnail_html(a),) for a in attachments)) or "-"

    @admin.display(description="message now")
    def message_now(self, report: Report) -> str:
        """The message as the store has it now (it may have been edited or deleted since)."""
        link = reverse("admin:chat_conversation_messages", args=[report.conversation_id])
        link += f"?after_seq={report.seq - 1}#seq-{report.seq}"
        try:
            message = selectors.message_at(conversation=report.conversation, seq=report.seq)
        except NotFound:
            message = None
        except StoreUnavailable:
            return format_html('(message store unavailable) <a href="{}">open in the message browser</a>', link)
        if message is None or message.message_id != report.message_id:
            state = "(no longer in the store)"
        elif message.deleted:
            state = "(deleted)"
        elif message.edited_at is not None:
            state = f"(edited {message.edited_at:%Y-%m-%d %H:%M:%S} UTC) {_preview(message.content)}"
        else:
            state = "(unchanged)"
        return format_html('{} <a href="{}">open in the message browser</a>', state, link)

    def _each(self, request: HttpRequest, queryset: QuerySet[Report], handle, done: str) -> None:
        """Apply `handle` to each selected report; one summary, and the failures by report."""
        count = 0
        for report in queryset.select_related("conversation", "sender"):
            try:
                if handle(report) is not False:
                    count += 1
            except ChatError as exc:
                self.message_user(request, f"Report #{report.pk}: {exc.detail}", messages.ERROR)
        self.message_user(request, f"{done}: {count} report(s).", messages.SUCCESS)

    @admin.action(description="Resolve selected reports", permissions=["change"])
    def resolve(self, request: HttpRequest, queryset: QuerySet[Report]) -> None:
        self._each(request, queryset, lambda r: moderation.report_resolve(moderator=request.user, report=r), "Resolved")

    @admin.action(description="Dismiss selected reports", permissions=["change"])
    def dismiss(self, request: HttpRequest, queryset: QuerySet[Report]) -> None:
        self._each(request, queryset, lambda r: moderation.report_dismiss(moderator=request.user, report=r), "Dismissed")

    @admin.action(description="Delete the reported messages (resolves their reports)", permissions=["delete_message"])
    def delete_message(self, request: HttpRequest, queryset: QuerySet[Report]) -> None:
        self._each(
            request,
            queryset,
            lambda r: moderation.report_delete_message(moderator=request.user, report=r),
            "Deleted the messages of",
        )

    @admin.action(
        description="Ban the senders from the conversations (resolves the reports)", permissions=["ban_sender"]
    )
    def ban_sender(self, request: HttpRequest, queryset: QuerySet[Report]) -> None:
        self._each(
            request,
            queryset,
            lambda r: moderation.report_ban_sender(moderator=request.user, report=r),
            "Banned the senders of",
        )


@admin.register(LogEntry)
class LogEntryAdmin(admin.ModelAdmin):
    """The admin log, read-only: who did what, when, including every moderation action."""

    list_display = ["action_time", "user", "content_type", "object_repr", "action_flag", "get_change_message"]
    list_filter = ["action_flag", "content_type"]
    search_fields = ["object_repr", "change_message", "user__username"]
    date_hierarchy = "action_time"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: LogEntry | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: LogEntry | None = None) -> bool:
        return False
