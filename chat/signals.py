"""Signals the chat domain sends for other apps to act on, so that chat never imports them.

`messages_persisted` is sent inside the sends' relational transaction (sends commit in batches),
after the messages reached the store: a receiver writes what must commit with them (the
notifications app writes their push outbox entries). A receiver that raises is logged and counted
and never fails the sends.
"""
from django.dispatch import Signal

messages_persisted = Signal(use_caching=True)  # kwargs: messages (a list of chat.store.Message)
