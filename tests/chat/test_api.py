"""REST: conversations, participants, read markers, sending and history."""
import uuid

import pytest

from accounts.models import User
from chat.services import conversations
from chat.models import Ban, Conversation, Participant

pytestmark = pytest.mark.django_db




@pytest.fixture
def people(make_user):
    return make_user("owner"), make_user("member"), make_user("outsider")


def create(client, **body):
    return client.post("/api/v1/conversations/", body, format="json")


class TestConversations:
    def test_group_create_makes_creator_owner(self, people, client_for):
        owner, member, _ = people
        response = create(client_for(owner), kind="group", title="Team", participant_ids=[str(member.pk)])
        assert response.status_code == 201
        roles = dict(Participant.objects.filter(conversation_id=response.data["id"]).values_list("user__username", "role"))
        assert roles == {"owner": "owner", "member": "member"}

    def test_creating_conversations_is_rate_limited_per_user(self, people, client_for, settings):
        # Anyone may add anyone to a group: without a limit one account could bury another's
        # conversations under its own on the user stream.
        owner, member, other = people
        settings.CHAT_CONVERSATION_CREATE_RATE = "2/hour"
        for title in ("one", "two"):
            assert create(client_for(owner), kind="group", title=title, participant_ids=[str(member.pk)]).status_code == 201
        refused = create(client_for(owner), kind="group", title="three", participant_ids=[str(member.pk)])
        assert refused.status_code == 429 and int(refused["Retry-After"]) >= 1
        assert create(client_for(other), kind="group", title="theirs", participant_ids=[]).status_code == 201
        assert Conversation.objects.filter(created_by=owner).count() == 2

    def test_direct_is_unique_per_pair(self, people, client_for):
        owner, member, _ = people
        first = create(client_for(owner), kind="direct", participant_ids=[str(member.pk)])
        again = create(client_for(member), kind="direct", participant_ids=[str(owner.pk)])
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.data["id"] == again.data["id"]
        assert Conversation.objects.filter(kind="direct").count() == 1

    @pytest.mark.parametrize(
        "body, field",
        [
            ({"kind": "direct", "participant_ids": []}, "participant_ids"),
            ({"kind": "direct", "participant_ids": ["__two__"]}, "participant_ids"),
            ({"kind": "direct", "participant_ids": ["__member__"], "title": "x"}, "title"),
            ({"kind": "group", "participant_ids": [str(uuid.UUID(int=1))]}, "participant_ids"),
            ({"kind": "group", "participant_ids": ["not-a-uuid"]}, "participant_ids"),
            ({"kind": "channel", "participant_ids": []}, "kind"),
            ({"kind": "group", "participant_ids": [], "title": "t" * 201}, "title"),
        ],
    )
    def test_create_rejects_bad_input(self, people, make_user, client_for, body, field):
        owner, member, outsider = people
        ids = {"__member__": [str(member.pk)], "__two__": [str(member.pk), str(outsider.pk)]}
        body = dict(body, participant_ids=[i for p in body["participant_ids"] for i in ids.get(p, [p])])
        response = create(client_for(owner), **body)
        assert response.status_code == 400 and field in response.data, response.data

    def test_group_size_limit(self, people, make_user, client_for, settings):
        settings.CHAT_MAX_GROUP_PARTICIPANTS = 3
        owner, member, outsider = people
        ok = create(client_for(owner), kind="group", participant_ids=[str(member.pk), str(outsider.pk)])
        assert ok.status_code == 201
        extra = make_user()
        too_many = create(client_for(owner), kind="group", participant_ids=[str(u.pk) for u in (member, outsider, extra)])
        assert too_many.status_code == 400 and "participant_ids" in too_many.data

    def test_list_shows_only_mine_with_unread_counts(self, people, client_for, make_group):
        owner, member, outsider = people
        mine = make_group(owner, member)
        make_group(outsider)
        for _ in range(3):
            client_for(owner).post("/api/v1/messages/", {"conversation_id": str(mine.pk), "content": "x"}, format="json")
        listing = client_for(member).get("/api/v1/conversations/")
        assert listing.status_code == 200
        assert [(c["id"], c["unread_count"], c["last_seq"]) for c in listing.data["results"]] == [(str(mine.pk), 3, 3)]
        assert client_for(owner).get("/api/v1/conversations/").data["results"][0]["unread_count"] == 0

    def test_banned_conversations_are_not_listed(self, people, client_for, make_group):
        owner, member, _ = people
        conversation = make_group(owner, member)
        Ban.objects.create(conversation=conversation, user=member)
        assert client_for(member).get("/api/v1/conversations/").data["results"] == []

    def test_detail_and_patch(self, people, client_for, make_group):
        owner, member, outsider = people
        conversation = make_group(owner, member)
        url = f"/api/v1/conversations/{conversation.pk}/"
        assert client_for(member).get(url).status_code == 200
        assert client_for(member).patch(url, {"title": "new"}, format="json").status_code == 403
        response = client_for(owner).patch(url, {"title": "new"}, format="json")
        assert response.status_code == 200 and response.data["title"] == "new"

    def test_non_member_and_unknown_id_get_the_same_403(self, people, client_for, make_group):
        owner, member, outsider = people
        conversation = make_group(owner, member)
        client = client_for(outsider)
        for suffix in ["", "messages/", "participants/"]:
            foreign = client.get(f"/api/v1/conversations/{conversation.pk}/{suffix}")
            unknown = client.get(f"/api/v1/conversations/{uuid.uuid4()}/{suffix}")
            assert foreign.status_code == unknown.status_code == 403
            assert foreign.data == unknown.data
        assert client.patch(f"/api/v1/conversations/{conversation.pk}/", {"title": "x"}, format="json").status_code == 403
        assert client.post(f"/api/v1/conversations/{conversation.pk}/read/", {"seq": 0}, format="json").status_code == 403


class TestParticipants:
    def url(self, conversation, user=None):
        base = f"/api/v1/conversations/{conversation.pk}/participants/"
        return f"{base}{user.pk}/" if user else base

    def test_the_list_follows_the_membership_rule(self, people, make_user, client_for, make_group):
        owner, member, outsider = people
        inactive = make_user()
        conversation = make_group(owner, member, outsider, inactive)
        conversations.ban_create(actor=owner, conversation=conversation, user=outsider)
        User.objects.filter(pk=inactive.pk).update(is_active=False)
        listed = {p["user_id"] for p in client_for(owner).get(self.url(conversation)).data}
        assert listed == {str(owner.pk), str(member.pk)}

    def test_owner_adds_and_lists(self, people, client_for, make_group):
        owner, member, outsider = people
        conversation = make_group(owner, member)
        added = client_for(owner).post(self.url(conversation), {"user_id": str(outsider.pk)}, format="json")
        assert added.status_code == 201 and added.data["role"] == "member"
        again = client_for(owner).post(self.url(conversation), {"user_id": str(outsider.pk)}, format="json")
        assert again.status_code == 200
        listed = client_for(outsider).get(self.url(conversation))
        assert sorted(p["username"] for p in listed.data) == ["member", "outsider", "owner"]

    def test_member_cannot_add_and_admin_cannot_appoint_admins(self, people, make_user, client_for, make_group):
        owner, member, outsider = people
        conversation = make_group(owner, member)
        assert client_for(member).post(self.url(conversation), {"user_id": str(outsider.pk)}, format="json").status_code == 403
        admin = make_user()
        client_for(owner).post(self.url(conversation), {"user_id": str(admin.pk), "role": "admin"}, format="json")
        refused = client_for(admin).post(self.url(conversation), {"user_id": str(outsider.pk), "role": "admin"}, format="json")
        assert refused.status_code == 403
        ok = client_for(admin).post(self.url(conversation), {"user_id": str(outsider.pk)}, format="json")
        assert ok.status_code == 201

    def test_banned_and_unknown_users_cannot_be_added(self, people, client_for, make_group):
        owner, member, outsider = people
        conversation = make_group(owner, member)
        Ban.objects.create(conversation=conversation, user=outsider)
        banned = client_for(owner).post(self.url(conversation), {"user_id": str(outsider.pk)}, format="json")
        unknown = client_for(owner).post(self.url(conversation), {"user_id": str(uuid.uuid4())}, format="json")
        assert banned.status_code == unknown.status_code == 400

    def test_new_participant_starts_with_history_read(self, people, client_for, make_group):
        owner, member, outsider = people
        conversation = make_group(owner, member)
        client_for(owner).post("/api/v1/messages/", {"conversation_id": str(conversation.pk), "content": "x"}, format="json")
        client_for(owner).post(self.url(conversation), {"user_id": str(outsider.pk)}, format="json")
        assert client_for(outsider).get("/api/v1/conversations/").data["results"][0]["unread_count"] == 0

    def test_removal_rules(self, people, make_user, client_for, make_group, published, django_capture_on_commit_callbacks):
        owner, member, outsider = people
        admin = make_user()
        conversation = make_group(owner, member, outsider)
        Participant.objects.filter(conversation=conversation, user=admin).delete()
        client_for(owner).post(self.url(conversation), {"user_id": str(admin.pk), "role": "admin"}, format="json")
        assert client_for(member).delete(self.url(conversation, outsider)).status_code == 403
        assert client_for(admin).delete(self.url(conversation, owner)).status_code == 403
        with django_capture_on_commit_callbacks(execute=True):
            assert client_for(admin).delete(self.url(conversation, outsider)).status_code == 204
        assert {"type": "membership.revoked", "user_id": str(outsider.pk)} in published
        assert client_for(member).delete(self.url(conversation, member)).status_code == 204  # leaving
        assert client_for(member).get(f"/api/v1/conversations/{conversation.pk}/").status_code == 403
        assert client_for(owner).delete(self.url(conversation, outsider)).status_code == 404

    def test_owner_leaving_hands_ownership_to_an_admin_first(self, people, make_user, client_for, make_group):
        owner, member, _ = people
        admin = make_user()
        conversation = make_group(owner, member)
        client_for(owner).post(self.url(conversation), {"user_id": str(admin.pk), "role": "admin"}, format="json")
        assert client_for(owner).delete(self.url(conversation, owner)).status_code == 204
        assert Participant.objects.get(conversation=conversation, user=admin).role == "owner"

    def test_direct_participants_are_fixed(self, people, client_for):
        owner, member, outsider = people
        conversation = create(client_for(owner), kind="direct", participant_ids=[str(member.pk)]).data
        conv = Conversation.objects.get(pk=conversation["id"])
        assert client_for(owner).post(self.url(conv), {"user_id": str(outsider.pk)}, format="json").status_code == 400
        assert client_for(owner).delete(self.url(conv, member)).status_code == 400


class TestReadMarker:
    @pytest.mark.django_db(transaction=True)  # its events go out on commit
    def test_never_moves_backwards_and_is_bounded(self, people, client_for, make_group, published):
        owner, member, _ = people
        conversation = make_group(owner, member)
        for _ in range(3):
            client_for(owner).post("/api/v1/messages/", {"conversation_id": str(conversation.pk), "content": "x"}, format="json")
        url = f"/api/v1/conversations/{conversation.pk}/read/"
        client = client_for(member)
        assert client.post(url, {"seq": 2}, format="json").data["last_read_seq"] == 2
        assert client.post(url, {"seq": 1}, format="json").data["last_read_seq"] == 2
        assert client.post(url, {"seq": 4}, format="json").status_code == 400
        assert client.post(url, {"seq": -1}, format="json").status_code == 400
        assert client.post(url, {"seq": "x"}, format="json").status_code == 400
        assert [e for e in published if e["type"] == "read"] == [{"type": "read", "user_id": str(member.pk), "seq": 2}]


class TestMessages:
    def send(self, client, conversation, headers=None, **body):
        return client.post(
            "/api/v1/messages/", {"conversation_id": str(conversation.pk), **body}, format="json", headers=headers
        )

    @pytest.mark.django_db(transaction=True)  # its events go out on commit
    def test_member_sends_201(self, people, client_for, make_group, published):
        owner, member, _ = people
        conversation = make_group(owner, member)
        published.clear()  # the group's conversation.joined events
        response = self.send(client_for(member), conversation, content="hello", metadata={"a": 1})
        assert response.status_code == 201
        assert set(response.data) == {
            "message_id", "conversation_id", "seq", "sender_id", "content", "message_type",
            "is_encrypted", "metadata", "sent_at", "edited_at", "deleted", "attachments", "reply_to",
        }
        assert response.data["attachments"] == []
        assert (response.data["seq"], response.data["sender_id"]) == (1, str(member.pk))
        assert published[0]["message"] == response.data

    def test_non_member_and_unknown_conversation_get_403(self, people, client_for, make_group):
        owner, member, outsider = people
        conversation = make_group(owner, member)
        assert self.send(client_for(outsider), conversation, content="x").status_code == 403
        unknown = client_for(owner).post("/api/v1/messages/", {"conversation_id": str(uuid.uuid4()), "content": "x"}, format="json")
        assert unknown.status_code == 403

    @pytest.mark.parametrize(
        "body, field",
        [
            ({"content": ""}, "content"),
            ({"content": "x" * 10_001}, "content"),
            ({"content": "x", "message_type": "gif"}, "message_type"),
            ({"content": "x", "metadata": "str"}, "metadata"),
            ({"content": "x", "metadata": {"k": "v" * 16_384}}, "metadata"),
            ({"content": "x", "is_encrypted": "maybe"}, "is_encrypted"),
        ],
    )
    def test_validation_errors_are_400_with_the_field(self, people, client_for, make_group, body, field):
        owner, member, _ = people
        conversation = make_group(owner, member)
        response = self.send(client_for(owner), conversation, **body)
        assert response.status_code == 400 and field in response.data

    def test_lone_surrogate_is_a_400_not_a_500(self, people, client_for, make_group):
        conversation = make_group(people[0])
        body = '{"conversation_id": "%s", "content": "\\ud800%s"}' % (conversation.pk, "x" * 3000)
        response = client_for(people[0]).post("/api/v1/messages/", body, content_type="application/json")
        assert response.status_code == 400 and "content" in response.data

    def test_missing_or_malformed_conversation_id_is_400(self, people, client_for):
        client = client_for(people[0])
        assert "conversation_id" in client.post("/api/v1/messages/", {"content": "x"}, format="json").data
        bad = client.post("/api/v1/messages/", {"content": "x", "conversation_id": "nope"}, format="json")
        assert bad.status_code == 400 and "conversation_id" in bad.data

    def test_ten_mib_file_content_is_accepted_and_more_is_refused(self, people, client_for, make_group):
        owner, member, _ = people
        conversation = make_group(owner, member)
        ten_mib = "x" * (10 * 1024 * 1024)
        assert self.send(client_for(owner), conversation, content=ten_mib, message_type="file").status_code == 201
        assert self.send(client_for(owner), conversation, content=ten_mib + "x", message_type="file").status_code == 400

    def test_idempotent_retry(self, people, client_for, make_group):
        owner, member, _ = people
        conversation = make_group(owner, member)
        client = client_for(owner)
        first = self.send(client, conversation, content="once", headers={"Idempotency-Key": "key-1"})
        again = self.send(client, conversation, content="once", headers={"Idempotency-Key": "key-1"})
        other = self.send(client, conversation, content="twice", headers={"Idempotency-Key": "key-1"})
        bad = self.send(client, conversation, content="x", headers={"Idempotency-Key": "x" * 256})
        assert (first.status_code, again.status_code, other.status_code, bad.status_code) == (201, 201, 422, 400)
        assert again.data == first.data and again["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first

    def test_rate_limit_429_with_retry_after(self, people, client_for, make_group, settings):
        settings.CHAT_SEND_RATE = "2/min"
        owner, member, _ = people
        conversation = make_group(owner, member)
        client = client_for(owner)
        responses = [self.send(client, conversation, content="x") for _ in range(3)]
        assert [r.status_code for r in responses] == [201, 201, 429]
        assert [r["RateLimit-Remaining"] for r in responses] == ["1", "0", "0"]
        assert all(r["RateLimit-Limit"] == "2" for r in responses)
        limited = responses[2]
        assert 1 <= int(limited["Retry-After"]) <= 60
        assert limited["RateLimit-Reset"] == limited["Retry-After"]
        assert limited.data["code"] == "rate_limited"

    def test_history_pages(self, people, client_for, make_group):
        owner, member, _ = people
        conversation = make_group(owner, member)
        client = client_for(owner)
        for i in range(7):
            self.send(client, conversation, content=f"m{i + 1}")
        url = f"/api/v1/conversations/{conversation.pk}/messages/"

        def seqs(**params):
            data = client.get(url, params).data
            return [m["seq"] for m in data["results"]], data["has_more"]

        assert seqs() == ([1, 2, 3, 4, 5, 6, 7], False)
        assert seqs(limit=3) == ([5, 6, 7], True)
        assert seqs(before_seq=5, limit=3) == ([2, 3, 4], True)
        assert seqs(before_seq=4, limit=3) == ([1, 2, 3], False)
        assert seqs(after_seq=2, limit=3) == ([3, 4, 5], True)
        assert seqs(after_seq=4, limit=3) == ([5, 6, 7], False)
        assert seqs(after_seq=1, before_seq=5) == ([2, 3, 4], False)
        assert seqs(after_seq=7) == ([], False)

    @pytest.mark.parametrize(
        "params", [{"limit": 0}, {"limit": 201}, {"after_seq": -1}, {"before_seq": "x"}, {"after_seq": 2**63}]
    )
    def test_history_rejects_bad_params(self, people, client_for, make_group, params):
        conversation = make_group(people[0])
        response = client_for(people[0]).get(f"/api/v1/conversations/{conversation.pk}/messages/", params)
        assert response.status_code == 400

    def test_history_limit_200_is_allowed(self, people, client_for, make_group):
        conversation = make_group(people[0])
        response = client_for(people[0]).get(f"/api/v1/conversations/{conversation.pk}/messages/", {"limit": 200})
        assert response.status_code == 200 and response.data == {"results": [], "has_more": False}


def test_schema_and_docs_are_served(client):
    schema = client.get("/api/schema/")
    assert schema.status_code == 200 and b"/api/v1/messages/" in schema.content
    assert client.get("/api/docs/").status_code == 200


def test_browsable_api_works_for_a_logged_in_user(client, make_user):
    user = make_user()
    client.force_login(user)
    page = client.get("/api/v1/conversations/", HTTP_ACCEPT="text/html")
    assert page.status_code == 200 and b"Conversation List" in page.content


@pytest.mark.parametrize("page", ["", "messages/", "participants/", "read/", "messages/1/"])
@pytest.mark.parametrize("conversation_is", ["foreign", "unknown"])
def test_browsable_api_answers_an_outsider_with_403_not_500(client, make_user, make_group, page, conversation_is):
    """DRF's HTML renderer runs the permission again while it renders the 403 (for its forms): the
    permission must raise DRF's own PermissionDenied there, not the domain error."""
    owner, member, outsider = make_user(), make_user(), make_user()
    conversation_id = make_group(owner, member).pk if conversation_is == "foreign" else uuid.uuid4()
    client.force_login(outsider)
    response = client.get(f"/api/v1/conversations/{conversation_id}/{page}", HTTP_ACCEPT="text/html")
    assert response.status_code == 403
    assert b"You are not a participant of this conversation." in response.content
    as_json = client.get(f"/api/v1/conversations/{conversation_id}/{page}", HTTP_ACCEPT="application/json")
    assert (as_json.status_code, as_json.json()) == (
        403, {"detail": "You are not a participant of this conversation.", "code": "forbidden"}
    )


def test_oversized_request_body_is_refused_cleanly(make_user, client_for):
    client = client_for(make_user())
    body = '{"conversation_id": "00000000-0000-0000-0000-000000000000", "content": "' + "x" * (12 * 1024 * 1024) + '"}'
    response = client.post("/api/v1/messages/", body, content_type="application/json")
    assert response.status_code in (400, 413)
