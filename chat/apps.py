import atexit
import os

from django.apps import AppConfig
from django.conf import settings
from django.core.signals import setting_changed


def _reset_configured_singletons(*, setting, **kwargs):
    # Tests (and anything else) that change these settings get objects built from the new values.
    from chat.presence import get_presence
    from chat.store import get_message_store

    if setting in {"CHAT_MESSAGE_STORE"}:
        get_message_store.cache_clear()
    if setting == "REDIS_URL":
        get_presence.cache_clear()


class ChatConfig(AppConfig):
    name = "chat"

    def ready(self) -> None:
        setting_changed.connect(_reset_configured_singletons, dispatch_uid="chat-reset-singletons")
        import chatproject.checks  # noqa: F401  (registers the configuration checks)
        from django.db.models.signals import post_delete, post_save

        from accounts.signals import credentials_revoked
        from chat.models import Ban, Participant
        from chat.services import conversations

        post_delete.connect(conversations.revoke_on_participant_delete, sender=Participant, dispatch_uid="chat-revoke-participant")
        post_save.connect(conversations.revoke_on_ban_save, sender=Ban, dispatch_uid="chat-revoke-ban")
        post_save.connect(conversations.join_on_participant_save, sender=Participant, dispatch_uid="chat-join-participant")
        post_delete.connect(conversations.leave_on_participant_delete, sender=Participant, dispatch_uid="chat-leave-participant")
        post_save.connect(conversations.leave_on_ban_save, sender=Ban, dispatch_uid="chat-leave-ban")
        post_delete.connect(conversations.join_on_ban_delete, sender=Ban, dispatch_uid="chat-join-ban-lifted")
        credentials_revoked.connect(conversations.revoke_on_credentials_revoked, dispatch_uid="chat-revoke-credentials")
        if settings.PROMETHEUS_MULTIPROC_DIR:
            # Several processes share one metrics directory: a process that exits must take its
            # live gauges (connections, subscriptions) with it.
            from prometheus_client import multiprocess

            def mark_dead_at_exit() -> None:
                atexit.register(multiprocess.mark_process_dead, os.getpid())

            mark_dead_at_exit()
            # The workers of `make run` are forked from a launcher that loaded the application
            # (scripts/serve.py): each inherits the hook above with the launcher's pid, and needs
            # one with its own for its own gauges.
            os.register_at_fork(after_in_child=mark_dead_at_exit)
