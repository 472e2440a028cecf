from rest_framework import serializers

from accounts.models import User


class RegisterInput(serializers.Serializer):
    username = serializers.RegexField(r"^[\w.@+-]+\Z", max_length=150)
    password = serializers.CharField(max_length=128, write_only=True, style={"input_type": "password"})


class UserOutput(serializers.ModelSerializer):
    class Meta:
        model = User
        fields = ["id", "username"]


class TokenOutput(serializers.Serializer):
    token = serializers.CharField()


class TicketOutput(serializers.Serializer):
    ticket = serializers.CharField()
    expires_in = serializers.IntegerField()
