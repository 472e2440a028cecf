"""Signals the accounts app sends, so that it imports no other app: whoever cares listens."""
from django.dispatch import Signal

# Sent when an account is deactivated, inside the deactivating transaction; kwargs: user_id.
# The chat app closes every socket of the account (4403) once the transaction commits.
user_deactivated = Signal()
