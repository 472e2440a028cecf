from rest_framework.permissions import BasePermission

from chat.access import access_conversation


class IsConversationParticipant(BasePermission):
    """The membership rule (chat.access) for every view under conversations/{conversation_id}/.

    It runs in has_permission, not has_object_permission, so no view can skip it by not calling
    get_object(); the view finds the (conversation, participant) pair on request.conversation_access.
    """

    def has_permission(self, request, view) -> bool:
        # AccessDenied propagates and becomes the same 403 for unknown and foreign conversations.
        request.conversation_access = access_conversation(
            user=request.user, conversation_id=view.kwargs["conversation_id"]
        )
        return True
