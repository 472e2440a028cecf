"""Signals the chat domain sends for other apps to act on, so that chat never imports them.

`message_persisted` is sent inside the send's relational transaction, after the message reached
the store: a receiver writes what must commit with the message (the notifications app writes the
push outbox entry). A receiver that raises is logged and counted and never fails the send.
"""
from django.dispatch import Signal

message_persisted = Signal(use_caching=True)  # kwargs: message (chat.store.Message)
