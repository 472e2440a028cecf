"""Operators' view of push notifications: the outbox, every delivery, the dead letters (with a
re-queue action on each), and registered devices."""
from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from notifications import services
from notifications.models import DeadLetter, Delivery, Device, Job, OutboxEntry

JOB_FIELDS = [
    "status", "attempts", "next_attempt_at", "claimed_by", "claimed_until", "last_error", "created_at", "finished_at"
]


class JobAdmin(admin.ModelAdmin):
    """Jobs are written by the send path and the workers only; here they are read and re-queued."""

    actions = ["requeue"]
    date_hierarchy = "created_at"
    list_per_page = 100

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: Job | None = None) -> list[str]:
        return [f.name for f in self.model._meta.fields]

    @admin.display(description="last error")
    def error_excerpt(self, job: Job) -> str:
        return job.last_error if len(job.last_error) <= 120 else job.last_error[:119] + "…"

    @admin.action(description="Re-queue: deliver again now, with a fresh set of attempts", permissions=["change"])
    def requeue(self, request: HttpRequest, queryset: QuerySet) -> None:
        selected = list(queryset.values_list("pk", flat=True))
        count = services.notification_requeue(queryset=self.model.objects.filter(pk__in=selected))
        for job in self.model.objects.filter(pk__in=selected, status=Job.Status.PENDING, attempts=0):
            self.log_change(request, job, "Re-queued for delivery.")
        skipped = len(selected) - count
        level = messages.SUCCESS if not skipped else messages.WARNING
        note = f" {skipped} left alone: already delivered or skipped, or being delivered right now." if skipped else ""
        self.message_user(request, f"Re-queued {count} job(s).{note}", level)


class DeliveryInline(admin.TabularInline):
    model = Delivery
    fields = ["user", "device", "status", "attempts", "next_attempt_at", "last_error", "finished_at"]
    readonly_fields = fields
    extra = 0
    show_change_link = True
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(OutboxEntry)
class OutboxEntryAdmin(JobAdmin):
    list_display = [
        "id", "conversation_id", "seq", "status", "attempts", "next_attempt_at", "created_at", "error_excerpt"
    ]
    list_filter = ["status", "created_at", "next_attempt_at"]
    search_fields = ["=message_id", "=conversation_id", "=sender_id"]
    fields = ["message_id", "conversation_id", "seq", "sender_id", *JOB_FIELDS]
    inlines = [DeliveryInline]


@admin.register(Delivery)
class DeliveryAdmin(JobAdmin):
    list_display = [
        "id", "user", "device_kind", "outbox", "status", "attempts", "next_attempt_at", "created_at", "error_excerpt"
    ]
    list_filter = ["status", "device__kind", "created_at", "next_attempt_at"]
    list_select_related = ["user", "device", "outbox"]
    search_fields = ["user__username", "=outbox__message_id", "=outbox__conversation_id"]
    fields = ["outbox", "user", "device", *JOB_FIELDS]

    @admin.display(description="device", ordering="device__kind")
    def device_kind(self, delivery: Delivery) -> str:
        return delivery.device.get_kind_display()


@admin.register(DeadLetter)
class DeadLetterAdmin(DeliveryAdmin):
    """Deliveries that used up their attempts. Fix the cause (last error), then re-queue them."""

    list_display = ["id", "user", "device_kind", "outbox", "attempts", "finished_at", "error_excerpt"]
    list_filter = ["device__kind", "finished_at"]
    date_hierarchy = "finished_at"

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).filter(status=Job.Status.DEAD)


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = ["id", "user", "kind", "name", "created_at", "updated_at"]
    list_filter = ["kind", "created_at"]
    list_select_related = ["user"]
    search_fields = ["user__username", "name"]
    readonly_fields = ["user", "kind", "endpoint", "p256dh", "auth", "token", "created_at", "updated_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
