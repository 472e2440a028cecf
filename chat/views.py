from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.generics import ListAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from chat import selectors
from core.errors import RateLimited
from core.pagination import StrictCursorPagination
from core.ratelimit import limiter_for
from chat.services import conversations, moderation, reactions
from chat.services.send import SendRequest, message_send
from chat.access import allowed_participants
from chat.permissions import IsConversationParticipant
from chat.serializers import (
    ChangesOutput,
    ChangesQuery,
    ConversationCreateInput,
    ConversationListOutput,
    ConversationMuteInput,
    ConversationOutput,
    ConversationUpdateInput,
    EditsOutput,
    EditsQuery,
    HistoryOutput,
    HistoryQuery,
    MessageChangeOutput,
    MessageEditInput,
    MessageOutput,
    MessageReportInput,
    MessageSendInput,
    ParticipantAddInput,
    ParticipantOutput,
    ReactionChangeOutput,
    ReadMarkerInput,
    RepliesQuery,
    ReportOutput,
)

MEMBER_ONLY = [IsAuthenticated, IsConversationParticipant]


class RecentActivityPagination(StrictCursorPagination):
    ordering = "-last_activity_at"
    page_size = 50


class ConversationListView(ListAPIView):
    """Your conversations, most recently active first, with unread counts."""

    serializer_class = ConversationListOutput
    pagination_class = RecentActivityPagination

    def get_queryset(self):
        return selectors.conversation_list_for(user=self.request.user)

    @extend_schema(request=ConversationCreateInput, responses={201: ConversationOutput, 200: ConversationOutput})
    def post(self, request):
        """Create a conversation; you become its owner. A direct conversation that already
        exists for the pair is returned with 200."""
        data = ConversationCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        # Anyone may add anyone to a group, and a user stream carries a user's most recently active
        # conversations: unlimited creation would let one account bury another's conversations.
        decision = limiter_for("conversation_create", settings.CHAT_CONVERSATION_CREATE_RATE).check(request.user.pk)
        if not decision.allowed:
            raise RateLimited(decision, what="new conversations")
        conversation, created = conversations.conversation_create(creator=request.user, **data.validated_data)
        if not created:  # an existing direct conversation: the caller may have muted it
            conversation.muted = selectors.conversation_muted_by(conversation_id=conversation.id, user=request.user)
        return Response(
            ConversationOutput(conversation).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )


class ConversationDetailView(APIView):
    permission_classes = MEMBER_ONLY

    @extend_schema(responses=ConversationOutput)
    def get(self, request, conversation_id):
        conversation, participant = request.conversation_access
        conversation.muted = participant.muted
        return Response(ConversationOutput(conversation).data)

    @extend_schema(request=ConversationUpdateInput, responses=ConversationOutput)
    def patch(self, request, conversation_id):
        data = ConversationUpdateInput(data=request.data)
        data.is_valid(raise_exception=True)
        conversation = conversations.conversation_update(
            actor=request.user, conversation_id=conversation_id, **data.validated_data
        )
        conversation.muted = request.conversation_access[1].muted
        return Response(ConversationOutput(conversation).data)


class ConversationMuteView(APIView):
    permission_classes = MEMBER_ONLY

    @extend_schema(request=ConversationMuteInput, responses=ConversationOutput)
    def put(self, request, conversation_id):
        """Mute or unmute the conversation for yourself: while muted, no push notifications reach
        you from it (replies to your own messages included). Messages still arrive on your
        sockets and count as unread."""
        data = ConversationMuteInput(data=request.data)
        data.is_valid(raise_exception=True)
        conversation, participant = conversations.conversation_mute(
            user=request.user, conversation_id=conversation_id, muted=data.validated_data["muted"]
        )
        conversation.muted = participant.muted
        return Response(ConversationOutput(conversation).data)


class ParticipantListView(ListAPIView):
    permission_classes = MEMBER_ONLY
    serializer_class = ParticipantOutput
    pagination_class = None

    def get_queryset(self):
        # Who is in the conversation, by the membership rule: a banned or deactivated account's
        # row stays (a lifted ban restores it) but it is not a participant meanwhile.
        return allowed_participants().filter(conversation_id=self.kwargs["conversation_id"]).select_related("user")

    @extend_schema(request=ParticipantAddInput, responses={201: ParticipantOutput, 200: ParticipantOutput})
    def post(self, request, conversation_id):
        """Add a participant (owner or admin; only the owner appoints admins)."""
        data = ParticipantAddInput(data=request.data)
        data.is_valid(raise_exception=True)
        participant, created = conversations.participant_add(
            actor=request.user, conversation_id=conversation_id, **data.validated_data
        )
        return Response(
            ParticipantOutput(participant).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )


class ParticipantDetailView(APIView):
    permission_classes = MEMBER_ONLY

    @extend_schema(responses={204: None})
    def delete(self, request, conversation_id, user_id):
        """Remove a participant: anyone may leave; the owner removes anyone; an admin removes members."""
        conversations.participant_remove(actor=request.user, conversation_id=conversation_id, user_id=user_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ReadMarkerView(APIView):
    permission_classes = MEMBER_ONLY

    @extend_schema(request=ReadMarkerInput, responses=ParticipantOutput)
    def post(self, request, conversation_id):
        """Move your read marker forward; it never moves backwards."""
        data = ReadMarkerInput(data=request.data)
        data.is_valid(raise_exception=True)
        participant = conversations.read_marker_set(
            user=request.user, conversation_id=conversation_id, seq=data.validated_data["seq"]
        )
        return Response(ParticipantOutput(participant).data)


class MessageSendView(APIView):
    @extend_schema(
        request=MessageSendInput,
        responses={201: MessageOutput},
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                OpenApiTypes.STR,
                OpenApiParameter.HEADER,
                description="1-255 printable ASCII characters. A retry with the same key and body returns "
                "the original message with the header Idempotent-Replayed: true.",
            )
        ],
    )
    def post(self, request):
        """Send a message to a conversation you participate in."""
        data = MessageSendInput(data=request.data)
        data.is_valid(raise_exception=True)
        result = message_send(
            SendRequest(
                sender=request.user, idempotency_key=request.headers.get("Idempotency-Key"), **data.validated_data
            )
        )
        response = Response(result.message.as_dict(), status=status.HTTP_201_CREATED)
        if result.replayed:
            response["Idempotent-Replayed"] = "true"
        for name, value in result.rate.headers().items():
            response[name] = value
        return response


class MessageHistoryView(APIView):
    permission_classes = MEMBER_ONLY

    @extend_schema(parameters=[HistoryQuery], responses=HistoryOutput)
    def get(self, request, conversation_id):
        """Messages in ascending seq. No cursor: the newest page; after_seq pages forward,
        before_seq pages backward; has_more says whether more exist in that direction."""
        query = HistoryQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        conversation, _ = request.conversation_access
        page = selectors.message_history(conversation=conversation, **query.validated_data)
        return Response({"results": _shown(request, page.messages), "has_more": page.has_more})


class MessageDetailView(APIView):
    permission_classes = MEMBER_ONLY

    @extend_schema(responses=MessageOutput, operation_id="v1_conversations_message_retrieve")
    def get(self, request, conversation_id, seq):
        """One message with its full content: how a client reads content that frames and history
        pages left out (`content_omitted: true`)."""
        conversation, _ = request.conversation_access
        return Response(_shown(request, [selectors.message_at(conversation=conversation, seq=seq)])[0])

    @extend_schema(request=MessageEditInput, responses=MessageChangeOutput)
    def patch(self, request, conversation_id, seq):
        """Edit your own message: new content (same limits as a send of its type), edited_at set;
        message_type, is_encrypted and metadata stay. Connected clients get message.updated.
        A deleted message cannot be edited (400). The answer carries the change number it took."""
        data = MessageEditInput(data=request.data)
        data.is_valid(raise_exception=True)
        message = moderation.message_edit(
            editor=request.user, conversation_id=conversation_id, seq=seq, content=data.validated_data["content"]
        )
        return Response(message.as_dict())

    @extend_schema(responses={200: MessageChangeOutput})
    def delete(self, request, conversation_id, seq):
        """Delete a message (its sender, the conversation's owner or admins, staff moderators). It
        stays as a tombstone: deleted=true, content and metadata removed; the tombstone is returned.
        Connected clients get message.deleted. `change` is the change number the delete took (null
        when the message was already deleted)."""
        message = moderation.message_delete(actor=request.user, conversation_id=conversation_id, seq=seq)
        return Response(message.as_dict())


def _shown(request, messages) -> list[dict]:
    """Messages as REST reads show them to the caller: with reactions (`me` for them) and reply
    counts. Answers to writes (send, edit, delete) carry the message as its frame does."""
    return selectors.message_views(conversation_id=request.conversation_access[0].id, messages=messages, viewer_id=request.user.pk)


class MessageRepliesView(APIView):
    permission_classes = MEMBER_ONLY

    @extend_schema(parameters=[RepliesQuery], responses=HistoryOutput)
    def get(self, request, conversation_id, seq):
        """The thread of a message: the messages replying to it, ascending by seq, after
        `after_seq`; has_more says whether more follow. Replies are ordinary messages of the
        conversation, so they also appear in its history and arrive as message.new."""
        query = RepliesQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        conversation, _ = request.conversation_access
        page = selectors.message_replies(conversation=conversation, seq=seq, **query.validated_data)
        return Response({"results": _shown(request, page.messages), "has_more": page.has_more})


class MessageEditsView(APIView):
    permission_classes = MEMBER_ONLY

    @extend_schema(parameters=[EditsQuery], responses=EditsOutput)
    def get(self, request, conversation_id, seq):
        """A message's edit history: the content each edit replaced, newest first (page on with
        before_change = the last entry's change). For the message's sender and for moderators
        (the chat.change_conversation permission); 403 for other members. Deleting a message
        deletes its history."""
        query = EditsQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        edits, has_more = moderation.access_message_edits(
            user=request.user, conversation_id=conversation_id, seq=seq, **query.validated_data
        )
        return Response({"results": [edit.as_dict() for edit in edits], "has_more": has_more})


EMOJI_PARAMETER = OpenApiParameter(
    "emoji", OpenApiTypes.STR, OpenApiParameter.PATH, description="1-64 bytes of UTF-8, no whitespace; percent-encoded."
)


class ReactionView(APIView):
    permission_classes = MEMBER_ONLY

    @extend_schema(request=None, parameters=[EMOJI_PARAMETER], responses={201: ReactionChangeOutput, 200: ReactionChangeOutput})
    def put(self, request, conversation_id, seq, emoji):
        """React to a message with `emoji` (1-64 bytes of UTF-8, no whitespace; URL-encoded).
        201 with the change number it took; 200 with change null when you had reacted so already.
        A message has at most 50 distinct emoji, 20 of them yours. Connected clients get
        reaction.added. Counts against your send rate."""
        result = reactions.reaction_add(user=request.user, conversation_id=conversation_id, seq=seq, emoji=emoji)
        return Response(result.as_dict(), status=status.HTTP_200_OK if result.change is None else status.HTTP_201_CREATED)

    @extend_schema(parameters=[EMOJI_PARAMETER], responses={200: ReactionChangeOutput})
    def delete(self, request, conversation_id, seq, emoji):
        """Take your reaction back: 200 with the change number it took, or change null when you
        had not reacted so. Connected clients get reaction.removed."""
        result = reactions.reaction_remove(user=request.user, conversation_id=conversation_id, seq=seq, emoji=emoji)
        return Response(result.as_dict())


class ChangeListView(APIView):
    permission_classes = MEMBER_ONLY

    @extend_schema(parameters=[ChangesQuery], responses=ChangesOutput)
    def get(self, request, conversation_id):
        """The conversation's changes (edits, deletes, reactions) after `after_change`, ascending
        by change number: how a client that was away learns what changed. `updated` entries carry
        the message as it is now; has_more says whether more follow."""
        query = ChangesQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        conversation, _ = request.conversation_access
        page = selectors.change_history(conversation=conversation, **query.validated_data)
        return Response(
            {"results": [selectors.change_entry(change, message) for change, message in page.changes], "has_more": page.has_more}
        )


class MessageReportView(APIView):
    permission_classes = MEMBER_ONLY

    @extend_schema(request=MessageReportInput, responses={201: ReportOutput, 200: ReportOutput})
    def post(self, request, conversation_id, seq):
        """Report someone else's message to the moderators. While your earlier report of the same
        message is open, it is returned with 200."""
        data = MessageReportInput(data=request.data)
        data.is_valid(raise_exception=True)
        report, created = moderation.message_report(
            reporter=request.user, conversation_id=conversation_id, seq=seq, reason=data.validated_data["reason"]
        )
        return Response(ReportOutput(report).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)
