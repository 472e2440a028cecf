"""Create benchmark users, tokens and group conversations in the database named by DATABASE_URL.

    DATABASE_URL=sqlite:////tmp/x.sqlite3 .venv/bin/python -m bench.seed --groups 200 --size 10 \
        --pairs 20 --out fixture.json

Users get unusable passwords and a token each (hashed, as accounts.services.token_issue stores them) (bulk inserts: seconds for thousands); the
conversations go through chat.services.conversations.conversation_create, the same code as the REST endpoint.
Writes {"groups": [[conv_id, [[user_id, token], ...]], ...], "pairs": [...], "stream"?: {"users",
"conversations"}} to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, required=True, help="group conversations")
    parser.add_argument("--size", type=int, default=10, help="participants per group")
    parser.add_argument("--pairs", type=int, default=0, help="two-person groups (persist scenario)")
    parser.add_argument("--stream-users", type=int, default=0, help="users of the user-stream scenario")
    parser.add_argument("--stream-per-user", type=int, default=20, help="conversations each of them is in")
    parser.add_argument("--stream-size", type=int, default=10, help="participants per conversation")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
    import django

    django.setup()
    from knox.models import AuthToken, get_digest_token
    from knox.settings import CONSTANTS, knox_settings
    from django.utils import timezone

    from accounts.models import User
    from chat.services.conversations import conversation_create

    run = uuid.uuid4().hex[:6]
    count = max(args.groups * args.size, args.pairs * 2, args.stream_users)
    users = [User(username=f"bench-{run}-{i}") for i in range(count)]
    for user in users:
        user.set_unusable_password()
    User.objects.bulk_create(users, batch_size=500)
    expiry = timezone.now() + knox_settings.TOKEN_TTL
    credentials, tokens = [], []
    for user in users:
        digest, key = get_digest_token()
        tokens.append(AuthToken(digest=digest, token_key=key[: CONSTANTS.TOKEN_KEY_LENGTH], user=user, expiry=expiry))
        credentials.append([str(user.pk), key])
    AuthToken.objects.bulk_create(tokens, batch_size=500)

    def group(members: list[int]) -> list:
        conversation, _ = conversation_create(
            creator=users[members[0]], kind="group", participant_ids=[users[i].pk for i in members[1:]],
            title="bench",
        )
        return [str(conversation.pk), [credentials[i] for i in members]]

    fixture = {
        "groups": [group(list(range(g * args.size, (g + 1) * args.size))) for g in range(args.groups)],
        "pairs": [group([2 * p, 2 * p + 1]) for p in range(args.pairs)],
    }
    if args.stream_users:
        # Overlapping teams: conversation c holds users c*size .. c*size+size-1 (mod the users), so
        # every user is in exactly per_user conversations and shares each with size-1 others.
        slots = args.stream_users * args.stream_per_user
        teams = [[(c * args.stream_size + j) % args.stream_users for j in range(args.stream_size)]
                 for c in range(slots // args.stream_size)]
        fixture["stream"] = {
            "users": credentials[: args.stream_users],
            "conversations": [[group(members)[0], members] for members in teams],  # members by user index
        }
    with open(args.out, "w") as handle:
        json.dump(fixture, handle)
    print(f"seeded {count} users, {args.groups} groups of {args.size}, {args.pairs} pairs", file=sys.stderr)


if __name__ == "__main__":
    main()
