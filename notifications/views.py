from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.generics import ListAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from core.errors import NotFound
from notifications import conf, services
from notifications.backends.webpush import vapid_public_key
from notifications.models import Device
from notifications.serializers import DeviceOutput, DeviceRegisterInput, VapidPublicKeyOutput


class DeviceListView(ListAPIView):
    """Your devices registered for push notifications."""

    serializer_class = DeviceOutput

    def get_queryset(self):
        return Device.objects.filter(user=self.request.user).order_by("created_at", "id")

    @extend_schema(request=DeviceRegisterInput, responses={201: DeviceOutput, 200: DeviceOutput})
    def post(self, request):
        """Register a device; 201 when new, 200 when the same subscription or token was already
        registered (it is updated, and now notifies you)."""
        data = DeviceRegisterInput(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        keys = fields.pop("keys", None) or {}
        device, created = services.device_register(
            user=request.user, p256dh=keys.get("p256dh", ""), auth=keys.get("auth", ""), **fields
        )
        return Response(DeviceOutput(device).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class DeviceDetailView(APIView):
    @extend_schema(responses={204: None})
    def delete(self, request, device_id):
        """Unregister one of your devices."""
        services.device_delete(user=request.user, device_id=device_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class VapidPublicKeyView(APIView):
    @extend_schema(responses=VapidPublicKeyOutput)
    def get(self, request):
        """The server's VAPID public key, for a browser to subscribe with; 404 when Web Push is
        not configured."""
        private_key = conf.load().vapid_private_key
        if not private_key:
            raise NotFound("Web Push is not configured on this server.")
        return Response({"public_key": vapid_public_key(private_key)})
