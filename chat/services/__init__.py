"""Every write of the chat domain, one module per concern, each emitting its events on commit:
`send` (the hot path: message_send), `conversations` (conversations, participants, bans, read
markers, revocation), `moderation` (edit, delete, report, the moderators' actions)."""
