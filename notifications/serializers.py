"""Small input/output serializers: they shape HTTP and document the schema; the rules live in
notifications.services."""
from rest_framework import serializers

from notifications.models import Device


class SubscriptionKeysInput(serializers.Serializer):
    p256dh = serializers.CharField(max_length=200)
    auth = serializers.CharField(max_length=100)


class DeviceRegisterInput(serializers.Serializer):
    """A browser sends its PushSubscription as it is (`endpoint`, `keys`) with kind `webpush`;
    a native app sends its FCM or APNs `token`."""

    kind = serializers.ChoiceField(choices=Device.Kind.choices)
    name = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
    endpoint = serializers.CharField(max_length=1024, required=False, default="")
    keys = SubscriptionKeysInput(required=False)
    token = serializers.CharField(max_length=512, required=False, default="")


class DeviceOutput(serializers.ModelSerializer):
    # The subscription's keys are write-only: the auth secret has no reason to travel back.
    class Meta:
        model = Device
        fields = ["id", "kind", "name", "endpoint", "token", "created_at", "updated_at"]


class VapidPublicKeyOutput(serializers.Serializer):
    public_key = serializers.CharField(help_text="applicationServerKey for PushManager.subscribe(), base64url.")
