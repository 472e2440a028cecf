from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.exceptions import NotFound
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from accounts import services
from accounts.models import User
from accounts.serializers import RegisterInput, TicketOutput, TokenOutput, UserOutput


class RegisterView(APIView):
    permission_classes = [AllowAny]
    authentication_classes: list = []

    @extend_schema(request=RegisterInput, responses={201: UserOutput})
    def post(self, request):
        if not settings.CHAT_ALLOW_REGISTRATION:
            raise NotFound("Registration is closed.")
        data = RegisterInput(data=request.data)
        data.is_valid(raise_exception=True)
        user = services.user_register(**data.validated_data)
        return Response(UserOutput(user).data, status=status.HTTP_201_CREATED)


class TokenView(ObtainAuthToken):
    # ObtainAuthToken hard-codes DRF's stock parsers; ours bound JSON nesting (core/parsers.py).
    parser_classes = api_settings.DEFAULT_PARSER_CLASSES

    @extend_schema(responses={200: TokenOutput})
    def post(self, request, *args, **kwargs):
        return super().post(request, *args, **kwargs)


class WebSocketTicketView(APIView):
    @extend_schema(request=None, responses={201: TicketOutput})
    def post(self, request):
        ticket = services.ws_ticket_issue(user=request.user)
        return Response(
            {"ticket": ticket, "expires_in": settings.CHAT_WS_TICKET_TTL}, status=status.HTTP_201_CREATED
        )


class MeView(generics.RetrieveAPIView):
    serializer_class = UserOutput

    def get_object(self):
        return self.request.user


class UserSearchView(generics.ListAPIView):
    """Active users whose username starts with `search` (case-insensitive)."""

    serializer_class = UserOutput

    def get_queryset(self):
        users = User.objects.filter(is_active=True).order_by("username")
        prefix = self.request.query_params.get("search", "").strip()
        if prefix:
            users = users.filter(username__istartswith=prefix)
        return users
