"""SPEC 4.1 over REST on both message stores: reactions (each one a change), replies and threads,
mute, and the edit history; with the membership rule and the bad input of each."""
from __future__ import annotations

import urllib.parse

import pytest
from django.contrib.auth.models import Permission
from django.db import DatabaseError

import chat.services.reactions  # noqa: F401 (imported before `message_store` swaps the store in)
from chat.models import Conversation, Participant
from chat.services.reactions import MAX_DISTINCT_EMOJI, MAX_EMOJI_PER_USER
from chat.services import conversations
from chat.store import StoreError
from tests.chat.test_moderation import (  # noqa: F401 (fixtures)
    browser_url,
    message_store,
    message_url,
    moderator_client,
    send,
    staff_client,
    trio,
)

pytestmark = pytest.mark.django_db


def reaction_url(conversation, seq, emoji):
    return message_url(conversation, seq, f"reactions/{urllib.parse.quote(emoji, safe='')}/")


def history(client, conversation, **query):
    return client.get(f"/api/v1/conversations/{conversation.id}/messages/", query).json()["results"]


def changes(client, conversation):
    return client.get(f"/api/v1/conversations/{conversation.id}/changes/").json()["results"]


def conversation_url(conversation, suffix=""):
    return f"/api/v1/conversations/{conversation.id}/{suffix}"


# --- reactions -------------------------------------------------------------------------------------


class TestReactions:
    @pytest.mark.django_db(transaction=True)  # its events go out on commit
    def test_put_and_delete_are_idempotent_numbered_logged_and_announced(self, message_store, trio, client_for, published):
        alice, bob, _, conversation = trio
        send(alice, conversation, "lunch?")
        published.clear()
        alice_client, bob_client = client_for(alice), client_for(bob)

        first = bob_client.put(reaction_url(conversation, 1, "👍"))
        assert first.status_code == 201, first.content
        assert first.json() == {
            "conversation_id": str(conversation.id), "seq": 1, "emoji": "👍", "user_id": str(bob.pk), "change": 1,
            "reactions": {"👍": {"count": 1, "me": True}},
        }
        again = bob_client.put(reaction_url(conversation, 1, "👍"))
        assert (again.status_code, again.json()["change"], again.json()["reactions"]) == (200, None, {"👍": {"count": 1, "me": True}})
        assert alice_client.put(reaction_url(conversation, 1, "👍")).json()["change"] == 2
        assert alice_client.put(reaction_url(conversation, 1, "🍕")).json()["change"] == 3

        # Every member sees the counts; `me` is their own.
        assert history(bob_client, conversation)[0]["reactions"] == {"👍": {"count": 2, "me": True}, "🍕": {"count": 1, "me": False}}
        assert history(alice_client, conversation)[0]["reactions"] == {"👍": {"count": 2, "me": True}, "🍕": {"count": 1, "me": True}}
        assert bob_client.get(message_url(conversation, 1)).json()["reactions"]["🍕"] == {"count": 1, "me": False}

        removed = bob_client.delete(reaction_url(conversation, 1, "👍"))
        assert (removed.status_code, removed.json()["change"]) == (200, 4)
        assert removed.json()["reactions"] == {"👍": {"count": 1, "me": False}, "🍕": {"count": 1, "me": False}}
        assert bob_client.delete(reaction_url(conversation, 1, "👍")).json()["change"] is None  # nothing to take back
        assert bob_client.delete(reaction_url(conversation, 1, "🎉")).json()["change"] is None

        reaction = lambda change, kind, user: {  # noqa: E731
            "type": kind, "conversation_id": str(conversation.id), "emoji": "👍", "user_id": str(user.pk), "seq": 1, "change": change,
        }
        assert published[:2] == [reaction(1, "reaction.added", bob), reaction(2, "reaction.added", alice)]
        assert published[3] == reaction(4, "reaction.removed", bob) and len(published) == 4
        logged = changes(alice_client, conversation)
        assert [(c["change"], c["kind"], c["seq"], c["emoji"], c["user_id"]) for c in logged] == [
            (1, "reaction.added", 1, "👍", str(bob.pk)),
            (2, "reaction.added", 1, "👍", str(alice.pk)),
            (3, "reaction.added", 1, "🍕", str(alice.pk)),
            (4, "reaction.removed", 1, "👍", str(bob.pk)),
        ]
        conversation.refresh_from_db()
        assert conversation.last_change == 4

    def test_at_most_fifty_distinct_emoji_per_message_and_twenty_per_person(self, message_store, trio, client_for, make_user):
        alice, bob, _, conversation = trio
        send(alice, conversation)
        emoji = [chr(0x1F600 + n) for n in range(MAX_DISTINCT_EMOJI)]
        members = [alice, bob] + [make_user(f"member{n}") for n in range(1)]
        for user in members[2:]:
            conversations.participant_add(actor=alice, conversation_id=conversation.id, user_id=user.pk)
        # One person cannot take every place: twenty emoji each.
        for each in emoji[:MAX_EMOJI_PER_USER]:
            assert client_for(alice).put(reaction_url(conversation, 1, each)).status_code == 201
        refused = client_for(alice).put(reaction_url(conversation, 1, emoji[-1]))
        assert refused.status_code == 400 and "emoji" in refused.json()
        for n, each in enumerate(emoji[MAX_EMOJI_PER_USER:]):
            assert client_for(members[1 + n // MAX_EMOJI_PER_USER]).put(reaction_url(conversation, 1, each)).status_code == 201
        # Fifty distinct: a new one is refused, whoever adds it.
        refused = client_for(members[2]).put(reaction_url(conversation, 1, "🦄"))
        assert refused.status_code == 400 and "emoji" in refused.json()
        # One already there can still be added by someone else, and a freed place taken.
        assert client_for(members[2]).put(reaction_url(conversation, 1, emoji[0])).status_code == 201
        assert client_for(alice).delete(reaction_url(conversation, 1, emoji[1])).json()["change"] is not None
        assert client_for(members[2]).put(reaction_url(conversation, 1, "🦄")).status_code == 201
        assert len(history(client_for(bob), conversation)[0]["reactions"]) == MAX_DISTINCT_EMOJI
        conversation.refresh_from_db()
        assert conversation.last_change == MAX_DISTINCT_EMOJI + 3  # the refused ones took no number

    @pytest.mark.parametrize(
        "emoji",
        [
            "a" * 65,
            "😀" * 17,  # 68 bytes
            "👍 👍",
            " ",
            "\t",
            "x\u00a0",  # no-break space
            "x\u2028",  # line separator
            "\u200b\x01",  # a control character
            "\ufffd",  # what invalid UTF-8 in the URL decodes to
            "x\u202e",  # right-to-left override (a format character)
            "\U000e0001",  # language tag (a format character outside a flag sequence)
            "\ue000",  # private use
            "\uffff",  # not a character
        ],
    )
    def test_bad_emoji_are_400_with_the_field(self, trio, client_for, emoji):
        alice, _, _, conversation = trio
        send(alice, conversation)
        response = client_for(alice).put(reaction_url(conversation, 1, emoji))
        assert response.status_code == 400 and "emoji" in response.json(), response.content
        assert Conversation.objects.get(pk=conversation.pk).last_change == 0

    def test_the_longest_emoji_allowed_is_64_bytes(self, trio, client_for):
        alice, _, _, conversation = trio
        send(alice, conversation)
        for emoji in ("😀" * 16, "a" * 64, "👩‍👩‍👧‍👦"):
            assert client_for(alice).put(reaction_url(conversation, 1, emoji)).status_code == 201

    def test_a_deleted_message_takes_no_reactions_and_loses_its_own(self, message_store, trio, client_for):
        alice, bob, _, conversation = trio
        send(alice, conversation)
        client_for(bob).put(reaction_url(conversation, 1, "👍"))
        client_for(alice).delete(message_url(conversation, 1))
        for call in (client_for(bob).put, client_for(bob).delete):
            response = call(reaction_url(conversation, 1, "👍"))
            assert response.status_code == 400 and "deleted" in str(response.json())
        assert history(client_for(bob), conversation)[0]["reactions"] == {}
        assert message_store.reactions(conversation.id, [1], bob.pk) == {}

    def test_outsiders_unknown_conversations_and_unknown_messages(self, trio, client_for):
        alice, bob, carol, conversation = trio
        send(alice, conversation)
        unknown = Conversation(id="00000000-0000-0000-0000-000000000001")
        assert client_for(carol).put(reaction_url(conversation, 1, "👍")).status_code == 403
        assert client_for(carol).delete(reaction_url(conversation, 1, "👍")).status_code == 403
        assert client_for(alice).put(reaction_url(unknown, 1, "👍")).status_code == 403
        assert client_for(alice).put(reaction_url(conversation, 2, "👍")).status_code == 404
        assert client_for(alice).put(reaction_url(conversation, 2**63, "👍")).status_code == 404
        # Someone who left is an outsider again.
        conversations.participant_remove(actor=bob, conversation_id=conversation.id, user_id=bob.pk)
        assert client_for(bob).put(reaction_url(conversation, 1, "👍")).status_code == 403
        assert Conversation.objects.get(pk=conversation.pk).last_change == 0

    def test_a_reaction_whose_change_does_not_commit_is_not_kept(self, message_store, trio, client_for, monkeypatch):
        # Cassandra is no part of the relational transaction: a failed commit after the store
        # write must undo it, or the retry would find it there and announce nothing.
        alice, bob, _, conversation = trio
        send(alice, conversation)

        def commit_fails(change):
            raise DatabaseError("the relational commit failed")

        def store_fails(*args):
            raise StoreError("down")

        with monkeypatch.context() as patched:
            patched.setattr(chat.services.reactions.events, "reaction_changed", commit_fails)
            assert client_for(bob).put(reaction_url(conversation, 1, "👍")).status_code == 503
            patched.setattr(message_store, "reaction_add", store_fails)
            assert client_for(bob).put(reaction_url(conversation, 1, "🎉")).status_code == 503
        assert message_store.reactions(conversation.id, [1], bob.pk) == {}
        assert Conversation.objects.get(pk=conversation.pk).last_change == 0
        retried = client_for(bob).put(reaction_url(conversation, 1, "👍"))
        assert (retried.status_code, retried.json()["change"]) == (201, 1)

    @pytest.mark.parametrize("emoji", ["👨\u200d👩\u200d👧", "🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f", "❤\ufe0f"])
    def test_emoji_sequences_with_joiners_tags_and_variation_selectors_are_taken(self, trio, client_for, emoji):
        alice, _, _, conversation = trio
        send(alice, conversation)
        assert client_for(alice).put(reaction_url(conversation, 1, emoji)).status_code == 201

    def test_reactions_count_against_the_send_rate(self, trio, client_for, settings):
        alice, _, _, conversation = trio
        send(alice, conversation)
        settings.CHAT_SEND_RATE = "2/min"
        assert client_for(alice).put(reaction_url(conversation, 1, "a")).status_code == 201
        assert client_for(alice).put(reaction_url(conversation, 1, "b")).status_code == 201
        refused = client_for(alice).put(reaction_url(conversation, 1, "c"))
        assert refused.status_code == 429 and int(refused["Retry-After"]) >= 1


# --- replies ---------------------------------------------------------------------------------------


class TestReplies:
    def send_over_rest(self, client, conversation, content, **fields):
        return client.post("/api/v1/messages/", {"conversation_id": str(conversation.id), "content": content, **fields}, format="json")

    def test_replies_are_messages_of_the_conversation_with_a_thread_paged_ascending(self, message_store, trio, client_for):
        alice, bob, _, conversation = trio
        send(alice, conversation, "question")  # 1
        send(alice, conversation, "other")  # 2
        for n in range(5):  # 3..7, the replies to 1 interleaved with ones to 2
            response = self.send_over_rest(client_for(bob), conversation, f"answer {n}", reply_to=1 if n != 2 else 2)
            assert response.status_code == 201, response.content
            assert response.json()["reply_to"] == (1 if n != 2 else 2)
            # The answer to a send is the message as its frame carries it: no reactions or count.
            assert "reactions" not in response.json() and "reply_count" not in response.json()

        shown = {m["seq"]: m for m in history(client_for(alice), conversation)}
        assert [(shown[s]["reply_to"], shown[s]["reply_count"]) for s in range(1, 8)] == [
            (None, 4), (None, 1), (1, 0), (1, 0), (2, 0), (1, 0), (1, 0)
        ]
        assert client_for(alice).get(message_url(conversation, 1)).json()["reply_count"] == 4

        thread = client_for(alice).get(message_url(conversation, 1, "replies/")).json()
        assert [m["seq"] for m in thread["results"]] == [3, 4, 6, 7] and thread["has_more"] is False
        assert thread["results"][0]["content"] == "answer 0" and thread["results"][0]["reactions"] == {}
        first = client_for(alice).get(message_url(conversation, 1, "replies/"), {"limit": 2}).json()
        assert [m["seq"] for m in first["results"]] == [3, 4] and first["has_more"] is True
        rest = client_for(alice).get(message_url(conversation, 1, "replies/"), {"after_seq": 4, "limit": 2}).json()
        assert [m["seq"] for m in rest["results"]] == [6, 7] and rest["has_more"] is False
        assert client_for(alice).get(message_url(conversation, 5, "replies/")).json() == {"results": [], "has_more": False}

    @pytest.mark.parametrize("reply_to", [0, -1, "one", 1.5, True, [1], {"seq": 1}, 2**63])
    def test_a_reply_to_that_is_no_seq_is_400(self, trio, client_for, reply_to):
        alice, _, _, conversation = trio
        send(alice, conversation)
        response = self.send_over_rest(client_for(alice), conversation, "x", reply_to=reply_to)
        assert response.status_code == 400 and "reply_to" in response.json(), response.content

    def test_replying_to_a_deleted_or_missing_message_or_across_conversations_is_400(self, message_store, trio, client_for, make_group):
        alice, bob, _, conversation = trio
        elsewhere = make_group(alice, bob, title="elsewhere")
        for n in range(3):
            send(alice, elsewhere, f"there {n}")
        send(alice, conversation, "here")  # 1
        send(alice, conversation, "gone")  # 2
        client_for(alice).delete(message_url(conversation, 2))
        for reply_to in (2, 3, 4):  # deleted; the other conversation has 3, this one not
            response = self.send_over_rest(client_for(bob), conversation, "re", reply_to=reply_to)
            assert response.status_code == 400 and "reply_to" in response.json(), (reply_to, response.content)
        assert Conversation.objects.get(pk=conversation.pk).last_seq == 2  # no seq burned
        assert self.send_over_rest(client_for(bob), conversation, "re", reply_to=None).json()["reply_to"] is None

    def test_nobody_replies_into_a_conversation_they_are_not_in(self, trio, client_for):
        alice, bob, carol, conversation = trio
        send(alice, conversation)
        assert self.send_over_rest(client_for(carol), conversation, "re", reply_to=1).status_code == 403
        conversations.participant_remove(actor=bob, conversation_id=conversation.id, user_id=bob.pk)
        assert self.send_over_rest(client_for(bob), conversation, "re", reply_to=1).status_code == 403
        assert client_for(carol).get(message_url(conversation, 1, "replies/")).status_code == 403

    def test_the_idempotency_key_covers_reply_to(self, trio, client_for):
        alice, _, _, conversation = trio
        send(alice, conversation)
        send(alice, conversation)
        headers = {"HTTP_IDEMPOTENCY_KEY": "reply-1"}
        first = client_for(alice).post("/api/v1/messages/", {"conversation_id": str(conversation.id), "content": "re", "reply_to": 1}, format="json", **headers)
        again = client_for(alice).post("/api/v1/messages/", {"conversation_id": str(conversation.id), "content": "re", "reply_to": 1}, format="json", **headers)
        other = client_for(alice).post("/api/v1/messages/", {"conversation_id": str(conversation.id), "content": "re", "reply_to": 2}, format="json", **headers)
        assert first.status_code == 201 and again["Idempotent-Replayed"] == "true" and again.json()["seq"] == first.json()["seq"]
        assert other.status_code == 422

    @pytest.mark.parametrize("query", [{"after_seq": "-1"}, {"after_seq": "x"}, {"limit": "0"}, {"limit": "201"}])
    def test_bad_thread_cursors_are_400_and_unknown_messages_404(self, trio, client_for, query):
        alice, _, _, conversation = trio
        send(alice, conversation)
        assert client_for(alice).get(message_url(conversation, 1, "replies/"), query).status_code == 400
        assert client_for(alice).get(message_url(conversation, 9, "replies/")).status_code == 404


# --- mute ------------------------------------------------------------------------------------------


class TestMute:
    def test_muted_is_the_callers_own_on_every_conversation_object(self, trio, client_for):
        alice, bob, _, conversation = trio
        response = client_for(bob).put(conversation_url(conversation, "mute/"), {"muted": True}, format="json")
        assert response.status_code == 200 and response.json()["muted"] is True and response.json()["id"] == str(conversation.id)
        assert client_for(bob).get(conversation_url(conversation)).json()["muted"] is True
        assert client_for(bob).get("/api/v1/conversations/").json()["results"][0]["muted"] is True
        assert client_for(alice).get(conversation_url(conversation)).json()["muted"] is False
        assert client_for(alice).get("/api/v1/conversations/").json()["results"][0]["muted"] is False
        client_for(alice).put(conversation_url(conversation, "mute/"), {"muted": True}, format="json")
        assert client_for(alice).patch(conversation_url(conversation), {"title": "t"}, format="json").json()["muted"] is True
        assert Participant.objects.get(conversation=conversation, user=bob).muted is True
        assert client_for(bob).put(conversation_url(conversation, "mute/"), {"muted": False}, format="json").json()["muted"] is False
        assert client_for(bob).get(conversation_url(conversation)).json()["muted"] is False

    def test_an_existing_direct_conversation_comes_back_with_your_mute(self, make_user, client_for):
        alice, bob = make_user("alice"), make_user("bob")
        created = client_for(alice).post("/api/v1/conversations/", {"kind": "direct", "participant_ids": [str(bob.pk)]}, format="json").json()
        conversation = Conversation.objects.get(pk=created["id"])
        client_for(alice).put(conversation_url(conversation, "mute/"), {"muted": True}, format="json")
        again = client_for(alice).post("/api/v1/conversations/", {"kind": "direct", "participant_ids": [str(bob.pk)]}, format="json")
        assert again.status_code == 200 and again.json()["muted"] is True

    @pytest.mark.parametrize("body", [{}, {"muted": "maybe"}, {"muted": None}, {"muted": [True]}])
    def test_bad_bodies_are_400(self, trio, client_for, body):
        _, bob, _, conversation = trio
        response = client_for(bob).put(conversation_url(conversation, "mute/"), body, format="json")
        assert response.status_code == 400 and "muted" in response.json()

    def test_outsiders_cannot_mute(self, trio, client_for):
        _, _, carol, conversation = trio
        unknown = Conversation(id="00000000-0000-0000-0000-000000000001")
        assert client_for(carol).put(conversation_url(conversation, "mute/"), {"muted": True}, format="json").status_code == 403
        assert client_for(carol).put(conversation_url(unknown, "mute/"), {"muted": True}, format="json").status_code == 403


# --- edit history ----------------------------------------------------------------------------------


class TestEditHistory:
    def edit(self, client, conversation, seq, content):
        response = client.patch(message_url(conversation, seq), {"content": content}, format="json")
        assert response.status_code == 200, response.content
        return response.json()

    def test_edits_count_against_the_send_rate(self, trio, client_for, settings):
        # Each edit is broadcast and keeps the content it replaces: one message is no licence for
        # unlimited edits.
        alice, _, _, conversation = trio
        send(alice, conversation)
        settings.CHAT_SEND_RATE = "2/min"
        self.edit(client_for(alice), conversation, 1, "one")
        self.edit(client_for(alice), conversation, 1, "two")
        refused = client_for(alice).patch(message_url(conversation, 1), {"content": "three"}, format="json")
        assert refused.status_code == 429 and int(refused["Retry-After"]) >= 1
        assert Conversation.objects.get(pk=conversation.pk).last_change == 2

    def test_the_sender_reads_every_earlier_version_newest_first(self, message_store, trio, client_for):
        alice, bob, _, conversation = trio
        sent = send(bob, conversation, "teh plan")
        first = self.edit(client_for(bob), conversation, 1, "the plan")
        second = self.edit(client_for(bob), conversation, 1, "the new plan")
        client_for(alice).put(reaction_url(conversation, 1, "👍"))  # a change, not an edit
        edits = client_for(bob).get(message_url(conversation, 1, "edits/")).json()
        assert edits == {
            "results": [
                {"change": second["change"], "content": "the plan", "written_at": first["edited_at"], "replaced_at": second["edited_at"]},
                {"change": first["change"], "content": "teh plan", "written_at": sent.as_dict()["sent_at"], "replaced_at": first["edited_at"]},
            ],
            "has_more": False,
        }
        page = client_for(bob).get(message_url(conversation, 1, "edits/"), {"limit": 1}).json()
        assert [e["content"] for e in page["results"]] == ["the plan"] and page["has_more"] is True
        older = client_for(bob).get(message_url(conversation, 1, "edits/"), {"before_change": page["results"][0]["change"]}).json()
        assert [e["content"] for e in older["results"]] == ["teh plan"] and older["has_more"] is False
        # An unedited message has no history.
        send(bob, conversation, "as sent")
        assert client_for(bob).get(message_url(conversation, 2, "edits/")).json() == {"results": [], "has_more": False}

    def test_other_members_may_not_read_it_moderators_may(self, message_store, trio, client_for, django_user_model):
        alice, bob, carol, conversation = trio
        send(bob, conversation, "first words")
        self.edit(client_for(bob), conversation, 1, "second words")
        # The conversation's owner is no moderator: what someone corrected is theirs to show.
        assert client_for(alice).get(message_url(conversation, 1, "edits/")).status_code == 403
        assert client_for(carol).get(message_url(conversation, 1, "edits/")).status_code == 403
        staff = django_user_model.objects.create_user(username="staff", is_staff=True)
        conversations.participant_add(actor=alice, conversation_id=conversation.id, user_id=staff.pk)
        assert client_for(staff).get(message_url(conversation, 1, "edits/")).status_code == 403
        staff.user_permissions.add(Permission.objects.get(codename="change_conversation"))
        staff = django_user_model.objects.get(pk=staff.pk)  # a fresh permission cache
        response = client_for(staff).get(message_url(conversation, 1, "edits/"))
        assert response.status_code == 200 and [e["content"] for e in response.json()["results"]] == ["first words"]

    def test_deleting_the_message_deletes_its_history(self, message_store, trio, client_for):
        _, bob, _, conversation = trio
        send(bob, conversation, "regrettable")
        self.edit(client_for(bob), conversation, 1, "less regrettable")
        client_for(bob).delete(message_url(conversation, 1))
        assert client_for(bob).get(message_url(conversation, 1, "edits/")).json() == {"results": [], "has_more": False}
        assert message_store.edits(conversation.id, 1, before_change=2**62) == []

    @pytest.mark.parametrize("query", [{"before_change": "0"}, {"before_change": "x"}, {"limit": "0"}, {"limit": "51"}])
    def test_bad_cursors_are_400_and_unknown_messages_404(self, trio, client_for, query):
        _, bob, _, conversation = trio
        send(bob, conversation)
        assert client_for(bob).get(message_url(conversation, 1, "edits/"), query).status_code == 400
        assert client_for(bob).get(message_url(conversation, 2, "edits/")).status_code == 404

    def test_the_admin_message_browser_shows_it_to_moderators(self, message_store, trio, client_for, moderator_client, staff_client):
        _, bob, _, conversation = trio
        send(bob, conversation, "draft one")
        self.edit(client_for(bob), conversation, 1, "draft two")
        self.edit(client_for(bob), conversation, 1, "final <b>text</b>")
        client, _ = moderator_client
        page = client.get(browser_url(conversation)).content.decode()
        assert "2 earlier versions" in page
        assert page.index("draft two") < page.index("draft one")  # newest first
        assert "final &lt;b&gt;text&lt;/b&gt;" in page  # escaped like every content
        # Staff who may only view conversations see the message as it is, not what it was.
        viewer, _ = staff_client("view_conversation")
        viewed = viewer.get(browser_url(conversation)).content.decode()
        assert "final &lt;b&gt;text&lt;/b&gt;" in viewed and "draft one" not in viewed and "earlier version" not in viewed
