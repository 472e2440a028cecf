from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"

    def ready(self) -> None:
        # The send path reaches the outbox through chat's signal: chat never imports this app.
        from chat.signals import messages_persisted
        from notifications.services import enqueue_on_messages_persisted

        messages_persisted.connect(enqueue_on_messages_persisted, dispatch_uid="notifications-enqueue")
