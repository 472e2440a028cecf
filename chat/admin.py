from django.contrib import admin

from chat import services
from chat.models import Ban, Conversation, Participant


class ParticipantInline(admin.TabularInline):
    model = Participant
    extra = 0
    autocomplete_fields = ["user"]
    readonly_fields = ["joined_at", "last_read_seq"]


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "title", "last_seq", "last_activity_at", "created_at"]
    list_filter = ["kind"]
    search_fields = ["=id", "title", "participants__user__username"]
    readonly_fields = ["last_seq", "last_activity_at", "created_at", "direct_key"]
    inlines = [ParticipantInline]


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
        banned = services.ban_create(actor=request.user, conversation=obj.conversation, user=obj.user, reason=obj.reason)
        obj.pk = banned.pk
