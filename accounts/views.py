from django.conf import settings
from django.contrib.auth import authenticate, logout, update_session_auth_hash
from drf_spectacular.utils import OpenApiParameter, extend_schema
from knox.models import AuthToken
from rest_framework import generics, status
from rest_framework.exceptions import NotFound
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import services, throttles
from accounts.models import User
from accounts.usernames import normalize_username
from accounts.serializers import (
    LoginInput,
    PasswordChangeInput,
    RegisterInput,
    TicketOutput,
    TokenOutput,
    UserOutput,
    UserSearchInput,
)
from core.errors import ValidationFailed


def _token_body(token: AuthToken, key: str) -> dict:
    return TokenOutput({"token": key, "expiry": token.expiry}).data


class RegisterView(APIView):
    permission_classes = [AllowAny]
    authentication_classes: list = []

    @extend_schema(request=RegisterInput, responses={201: UserOutput})
    def post(self, request):
        if not settings.CHAT_ALLOW_REGISTRATION:
            raise NotFound("Registration is closed.")
        # Every attempt counts, valid or not: a refused name must not be a free username probe.
        throttles.registration_check(request=request)
        data = RegisterInput(data=request.data)
        data.is_valid(raise_exception=True)
        user = services.user_register(**data.validated_data)
        return Response(UserOutput(user).data, status=status.HTTP_201_CREATED)


class TokenView(APIView):
    """Log in: a new token for this device. Other devices' tokens are untouched."""

    permission_classes = [AllowAny]
    authentication_classes: list = []

    @extend_schema(request=LoginInput, responses={200: TokenOutput})
    def post(self, request):
        data = LoginInput(data=request.data)
        data.is_valid(raise_exception=True)
        user = authenticate(request, **data.validated_data)  # throttled: 429 before any hash
        if user is None:
            raise ValidationFailed({"non_field_errors": ["Unable to log in with provided credentials."]})
        return Response(_token_body(*services.token_issue(user=user)))


class LogoutView(APIView):
    """Revoke the token this request carries (only this device); a session is logged out."""

    @extend_schema(request=None, responses={204: None})
    def post(self, request):
        if isinstance(request.auth, AuthToken):
            services.token_revoke(token=request.auth)
        else:
            logout(request._request)
        return Response(status=status.HTTP_204_NO_CONTENT)


class PasswordChangeView(APIView):
    """Every token and ticket of the account dies; the caller gets a fresh token (and keeps its session)."""

    @extend_schema(request=PasswordChangeInput, responses={200: TokenOutput})
    def post(self, request):
        data = PasswordChangeInput(data=request.data)
        data.is_valid(raise_exception=True)
        user = request.user
        # Through the throttled backend: a stolen token is no free password oracle.
        checked = authenticate(request, username=user.get_username(), password=data.validated_data["old_password"])
        if checked is None or checked.pk != user.pk:
            raise ValidationFailed({"old_password": ["Wrong password."]})
        token, key = services.password_change(user=user, new_password=data.validated_data["new_password"])
        if not isinstance(request.auth, AuthToken):  # a session caller stays logged in
            update_session_auth_hash(request._request, user)
        return Response(_token_body(token, key))


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
    """Active, non-staff users whose username starts with `search` (at least 2 characters,
    case-insensitive). Staff accounts are never listed."""

    serializer_class = UserOutput

    @extend_schema(parameters=[OpenApiParameter("search", str, required=True, description="at least 2 characters")])
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        query = UserSearchInput(data={"search": self.request.query_params.get("search", "")})
        query.is_valid(raise_exception=True)
        prefix = normalize_username(query.validated_data["search"])
        return (
            User.objects.filter(is_active=True, is_staff=False, is_superuser=False, username__istartswith=prefix)
            .order_by("username")
        )
