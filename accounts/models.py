import uuid

from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)

    class Meta(AbstractUser.Meta):
        swappable = "AUTH_USER_MODEL"


class WebSocketTicket(models.Model):
    """A one-time credential for browsers that cannot set headers on a WebSocket handshake.

    Only the SHA-256 of the ticket is stored, so a database read does not hand out live tickets.
    """

    key_hash = models.CharField(max_length=64, primary_key=True)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="+")
    expires_at = models.DateTimeField(db_index=True)
