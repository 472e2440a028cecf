from rest_framework.exceptions import PermissionDenied
from rest_framework.permissions import BasePermission

from chat.access import access_conversation
from core.errors import AccessDenied


class IsConversationParticipant(BasePermission):
    """The membership rule (chat.access) for every view under conversations/{conversation_id}/.

    It runs in has_permission, not has_object_permission, so no view can skip it by not calling
    get_object(); the view finds the (conversation, participant) pair on request.conversation_access.
    """

    def has_permission(self, request, view) -> bool:
        try:
            request.conversation_access = access_conversation(
                user=request.user, conversation_id=view.kwargs["conversation_id"]
            )
        except AccessDenied as exc:
            # DRF's own exception, not the domain one: the browsable API runs the permission again
            # while it renders the 403 (for its forms) and handles only DRF's exceptions there.
            raise PermissionDenied(detail=str(exc.detail), code=exc.code) from None
        return True
