import uuid

from django.contrib.auth.models import AbstractUser, UserManager as DjangoUserManager
from django.contrib.auth.validators import ASCIIUsernameValidator
from django.db import models
from django.db.models.functions import Lower
from django.db.models.lookups import Exact

from accounts.usernames import is_valid_username, normalize_username


class UserManager(DjangoUserManager):
    def get_by_natural_key(self, username):
        """The login lookup: NFKC-normalized and case-insensitive, as usernames are unique."""
        name = normalize_username(username)
        if is_valid_username(name):
            return self.get(Exact(Lower("username"), name.lower()))
        if "\x00" in name:  # cannot be stored; PostgreSQL would refuse the query
            raise self.model.DoesNotExist
        return self.get(username=name)  # accounts named before the ASCII rule


class User(AbstractUser):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    username_validator = ASCIIUsernameValidator()
    username = models.CharField(
        "username",
        max_length=150,
        unique=True,
        help_text="Required. 150 characters or fewer. ASCII letters, digits and @/./+/-/_ only.",
        validators=[username_validator],
        error_messages={"unique": "A user with that username already exists."},
    )

    objects = UserManager()

    class Meta(AbstractUser.Meta):
        swappable = "AUTH_USER_MODEL"
        constraints = [
            models.UniqueConstraint(
                Lower("username"),
                name="accounts_user_username_ci_unique",
                violation_error_message="A user with that username already exists.",
            )
        ]


class WebSocketTicket(models.Model):
    """A one-time credential for browsers that cannot set headers on a WebSocket handshake.

    Only the SHA-256 of the ticket is stored, so a database read does not hand out live tickets.
    """

    key_hash = models.CharField(max_length=64, primary_key=True)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="+")
    expires_at = models.DateTimeField(db_index=True)
