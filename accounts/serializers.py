from rest_framework import serializers

from accounts.models import User
from accounts.usernames import INVALID_MESSAGE, MAX_LENGTH, is_valid_username, normalize_username


class RegisterInput(serializers.Serializer):
    username = serializers.CharField(max_length=MAX_LENGTH * 4, help_text=INVALID_MESSAGE + " NFKC-normalized.")
    password = serializers.CharField(
        max_length=128, write_only=True, trim_whitespace=False, style={"input_type": "password"}
    )

    def validate_username(self, value: str) -> str:
        name = normalize_username(value)
        if not is_valid_username(name):
            raise serializers.ValidationError(INVALID_MESSAGE)
        return name


class LoginInput(serializers.Serializer):
    username = serializers.CharField(max_length=MAX_LENGTH * 4)
    password = serializers.CharField(
        max_length=4096, write_only=True, trim_whitespace=False, style={"input_type": "password"}
    )


class PasswordChangeInput(serializers.Serializer):
    old_password = serializers.CharField(max_length=4096, trim_whitespace=False, style={"input_type": "password"})
    new_password = serializers.CharField(max_length=128, trim_whitespace=False, style={"input_type": "password"})


class UserSearchInput(serializers.Serializer):
    search = serializers.CharField(
        min_length=2, max_length=MAX_LENGTH, help_text="Username prefix, at least 2 characters (case-insensitive)."
    )


class UserOutput(serializers.ModelSerializer):
    class Meta:
        model = User
        fields = ["id", "username"]


class TokenOutput(serializers.Serializer):
    token = serializers.CharField()
    expiry = serializers.DateTimeField(help_text="When the token expires unless used; each use moves it.")


class TicketOutput(serializers.Serializer):
    ticket = serializers.CharField()
    expires_in = serializers.IntegerField()
