"""Small input/output serializers: they shape HTTP and document the schema; the rules live in
chat.services."""
from rest_framework import serializers

from chat.models import Conversation, Participant, Report
from chat.services.moderation import MAX_REPORT_REASON_LENGTH
from chat.services.send import MESSAGE_TYPES
from chat.store import CHANGE_KINDS


class ConversationCreateInput(serializers.Serializer):
    kind = serializers.ChoiceField(choices=Conversation.Kind.choices)
    title = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    participant_ids = serializers.ListField(child=serializers.UUIDField(), max_length=10_000)


class ConversationUpdateInput(serializers.Serializer):
    title = serializers.CharField(max_length=200, allow_blank=True)


class ConversationOutput(serializers.ModelSerializer):
    muted = serializers.SerializerMethodField(help_text="Whether you muted the conversation (PUT .../mute/).")

    class Meta:
        model = Conversation
        fields = ["id", "kind", "title", "created_by", "created_at", "last_seq", "last_change", "last_activity_at", "muted"]

    def get_muted(self, conversation: Conversation) -> bool:
        # The caller's own setting: annotated by the conversation list, set by the views that
        # hold the caller's participation; a conversation just joined is not muted.
        return bool(getattr(conversation, "muted", False))


class ConversationMuteInput(serializers.Serializer):
    muted = serializers.BooleanField()


class ConversationListOutput(ConversationOutput):
    unread_count = serializers.IntegerField()
    last_read_seq = serializers.IntegerField()

    class Meta(ConversationOutput.Meta):
        fields = ConversationOutput.Meta.fields + ["unread_count", "last_read_seq"]


class ParticipantOutput(serializers.ModelSerializer):
    user_id = serializers.UUIDField()
    username = serializers.CharField(source="user.username")

    class Meta:
        model = Participant
        fields = ["user_id", "username", "role", "joined_at", "last_read_seq", "muted"]


class ParticipantAddInput(serializers.Serializer):
    user_id = serializers.UUIDField()
    role = serializers.ChoiceField(choices=[Participant.Role.ADMIN, Participant.Role.MEMBER], default="member")


class ReadMarkerInput(serializers.Serializer):
    seq = serializers.IntegerField(min_value=0)


class MessageSendInput(serializers.Serializer):
    conversation_id = serializers.UUIDField()
    # Limits (10,000 bytes for text, 10 MiB otherwise) depend on the type: checked by the service,
    # which also allows it empty when the message carries attachments.
    content = serializers.CharField(trim_whitespace=False, allow_blank=True, default="")
    message_type = serializers.ChoiceField(choices=MESSAGE_TYPES, default="text")
    is_encrypted = serializers.BooleanField(default=False)
    metadata = serializers.DictField(required=False, default=dict, help_text="JSON object, at most 16 KiB.")
    attachments = serializers.ListField(
        child=serializers.UUIDField(),
        required=False,
        default=None,
        allow_null=True,
        help_text="1-10 of your own uploads (POST attachments/) that no message carries yet; content may then be empty.",
    )
    reply_to = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=2**63 - 1,
        help_text="The seq of the message this one replies to: a message of the same conversation, not deleted.",
    )


class MessageEditInput(serializers.Serializer):
    # Limits depend on the message's type, which an edit keeps: checked by the service.
    content = serializers.CharField(trim_whitespace=False)


class MessageReportInput(serializers.Serializer):
    reason = serializers.CharField(max_length=MAX_REPORT_REASON_LENGTH)


class ReportOutput(serializers.ModelSerializer):
    conversation_id = serializers.UUIDField()

    class Meta:
        model = Report
        fields = ["id", "conversation_id", "seq", "message_id", "reason", "status", "created_at"]


class AttachmentOutput(serializers.Serializer):
    """What messages carry for each attachment, and what an upload answers; never the bytes."""

    attachment_id = serializers.UUIDField()
    name = serializers.CharField()
    content_type = serializers.CharField(help_text="Sniffed from the bytes, not taken from the client.")
    size = serializers.IntegerField()
    sha256 = serializers.CharField()
    width = serializers.IntegerField(allow_null=True, help_text="Images only.")
    height = serializers.IntegerField(allow_null=True, help_text="Images only.")
    url = serializers.CharField(help_text="GET it for the bytes.")
    thumbnail_url = serializers.CharField(allow_null=True, help_text="Images only.")


class ReactionOutput(serializers.Serializer):
    count = serializers.IntegerField()
    me = serializers.BooleanField(help_text="Whether you reacted with this emoji.")


class MessageOutput(serializers.Serializer):
    message_id = serializers.UUIDField()
    conversation_id = serializers.UUIDField()
    seq = serializers.IntegerField()
    sender_id = serializers.UUIDField()
    content = serializers.CharField(
        allow_null=True, help_text="null when content_omitted: read the message's own endpoint for it."
    )
    message_type = serializers.ChoiceField(choices=MESSAGE_TYPES)
    is_encrypted = serializers.BooleanField()
    metadata = serializers.DictField()
    sent_at = serializers.DateTimeField()
    edited_at = serializers.DateTimeField(allow_null=True)
    deleted = serializers.BooleanField()
    attachments = AttachmentOutput(many=True)
    reply_to = serializers.IntegerField(allow_null=True, help_text="The seq of the message this one replies to.")
    reactions = serializers.DictField(
        child=ReactionOutput(),
        required=False,
        help_text="In reads (history, one message, threads) only: {emoji: {count, me}}, `me` for you. "
        "Frames and the answers to writes carry the message without it.",
    )
    reply_count = serializers.IntegerField(
        required=False, help_text="In reads only, as reactions: how many messages reply to this one."
    )
    content_omitted = serializers.BooleanField(
        required=False,
        help_text="Present (true) only in history pages and frames, when the content is over "
        "CHAT_INLINE_CONTENT_BYTES: GET conversations/{id}/messages/{seq}/ returns it.",
    )


class HistoryQuery(serializers.Serializer):
    after_seq = serializers.IntegerField(min_value=0, max_value=2**63 - 1, required=False)
    before_seq = serializers.IntegerField(min_value=1, max_value=2**63 - 1, required=False)
    limit = serializers.IntegerField(min_value=1, max_value=200, default=50)


class HistoryOutput(serializers.Serializer):
    results = MessageOutput(many=True)
    has_more = serializers.BooleanField()


class MessageChangeOutput(MessageOutput):
    change = serializers.IntegerField(
        allow_null=True, help_text="The change number this edit or delete took; null when it changed nothing."
    )


class ChangesQuery(serializers.Serializer):
    after_change = serializers.IntegerField(min_value=0, max_value=2**63 - 2, default=0)
    limit = serializers.IntegerField(min_value=1, max_value=200, default=50)


class ChangeEntryOutput(serializers.Serializer):
    change = serializers.IntegerField()
    kind = serializers.ChoiceField(choices=CHANGE_KINDS)
    seq = serializers.IntegerField()
    at = serializers.DateTimeField()
    message = MessageOutput(required=False, help_text="updated: the message as it is now.")
    emoji = serializers.CharField(required=False, help_text="reactions: the emoji.")
    user_id = serializers.UUIDField(required=False, help_text="reactions: who reacted.")


class ChangesOutput(serializers.Serializer):
    results = ChangeEntryOutput(many=True)
    has_more = serializers.BooleanField()


class RepliesQuery(serializers.Serializer):
    after_seq = serializers.IntegerField(min_value=0, max_value=2**63 - 2, default=0)
    limit = serializers.IntegerField(min_value=1, max_value=200, default=50)


class ReactionChangeOutput(serializers.Serializer):
    conversation_id = serializers.UUIDField()
    seq = serializers.IntegerField()
    emoji = serializers.CharField()
    user_id = serializers.UUIDField()
    change = serializers.IntegerField(allow_null=True, help_text="The change number this took; null when it changed nothing.")
    reactions = serializers.DictField(child=ReactionOutput(), help_text="The message's reactions now.")


class EditsQuery(serializers.Serializer):
    before_change = serializers.IntegerField(min_value=1, max_value=2**63 - 1, required=False)
    limit = serializers.IntegerField(min_value=1, max_value=50, default=20)


class EditOutput(serializers.Serializer):
    change = serializers.IntegerField(help_text="The change number of the edit that replaced this content.")
    content = serializers.CharField()
    written_at = serializers.DateTimeField(help_text="When this content was written (sent, or an earlier edit).")
    replaced_at = serializers.DateTimeField(help_text="When the edit replaced it.")


class EditsOutput(serializers.Serializer):
    results = EditOutput(many=True)
    has_more = serializers.BooleanField()
