"""The browsable API's front page: links to every top-level endpoint."""
from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.views import APIView


class ApiRoot(APIView):
    permission_classes = [AllowAny]

    @extend_schema(exclude=True)
    def get(self, request):
        names = [
            "register", "token", "ws-ticket", "me", "user-search", "conversation-list", "message-send",
            "push-device-list",
        ]
        links = {name: reverse(name, request=request) for name in names}
        links["schema"] = reverse("schema", request=request)
        links["docs"] = reverse("docs", request=request)
        return Response(links)


urlpatterns = [path("", ApiRoot.as_view(), name="api-root")]
