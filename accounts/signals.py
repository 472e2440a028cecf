"""Signals the accounts app sends, so that it imports no other app: whoever cares listens."""
from django.dispatch import Signal

# Sent whenever every credential of an account dies (deactivation by any path, a password change),
# inside that transaction; kwargs: user_id. The chat app closes every socket of the account (4403)
# once the transaction commits: a socket authenticated with a dead token must not live on.
credentials_revoked = Signal()
