"""However an account is saved inactive (the admin's form, a shell, a data fix), its credentials
die with it, so that re-activating it does not revive them. services.user_deactivate, which
updates without saving, revokes them itself."""
from django.db.models.signals import post_save
from django.dispatch import receiver

from accounts.models import User


@receiver(post_save, sender=User, dispatch_uid="accounts.revoke_credentials_of_inactive")
def revoke_credentials_of_inactive(sender, instance: User, created: bool, **kwargs) -> None:
    if not instance.is_active and not created:
        from accounts.services import credentials_revoke_all

        credentials_revoke_all(user=instance)
