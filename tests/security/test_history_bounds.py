"""SPEC section 10: history pages are bounded in bytes as well as in count. A member asking for
`limit=200` pages of 10 MiB media must not make the process read 2 GiB at once or answer with it."""
import pytest

from chat import selectors
from chat.store import get_message_store
from tests.conftest import use_message_store

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation(make_user, make_group):
    owner = make_user("owner")
    return owner, make_group(owner)


def send(client, conversation, content, message_type="file"):
    response = client.post(
        "/api/v1/messages/",
        {"conversation_id": str(conversation.pk), "content": content, "message_type": message_type},
        format="json",
    )
    assert response.status_code == 201, response.data
    return response.data


def page(client, conversation, **params):
    response = client.get(f"/api/v1/conversations/{conversation.pk}/messages/", params)
    assert response.status_code == 200
    return response.data


class RecordingStore:
    """The configured store, recording the limit of every history read."""

    def __init__(self, store):
        self._store, self.limits = store, []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def history(self, conversation_id, **kwargs):
        self.limits.append(kwargs["limit"])
        return self._store.history(conversation_id, **kwargs)


def test_large_content_is_left_out_of_pages_and_read_one_message_at_a_time(conversation, client_for, settings):
    settings.CHAT_INLINE_CONTENT_BYTES = 1000
    owner, conversation = conversation
    client = client_for(owner)
    small = send(client, conversation, "a" * 1000)
    wide = send(client, conversation, "é" * 600)  # 600 characters, 1200 bytes of UTF-8: over
    large = send(client, conversation, "b" * 5000)
    results = page(client, conversation)["results"]
    read = {"reactions": {}, "reply_count": 0}  # what reads add to the message a send answers
    assert results == [
        {**small, **read},
        {**wide, **read, "content": None, "content_omitted": True},
        {**large, **read, "content": None, "content_omitted": True},
    ]
    for message in (wide, large):
        full = client.get(f"/api/v1/conversations/{conversation.pk}/messages/{message['seq']}/")
        assert full.status_code == 200 and full.data == {**message, **read}


def test_a_page_stops_at_max_page_bytes_but_never_empty(conversation, client_for, settings):
    owner, conversation = conversation
    client = client_for(owner)
    for i in range(6):
        send(client, conversation, str(i) * 900)
    # Each message costs its 900 bytes of content plus its envelope: two fit in 3000 bytes.
    settings.CHAT_MAX_PAGE_BYTES = 3000

    def seqs(**params):
        data = page(client, conversation, **params)
        return [m["seq"] for m in data["results"]], data["has_more"]

    assert seqs(after_seq=0) == ([1, 2], True)
    assert seqs(after_seq=2) == ([3, 4], True)
    assert seqs(after_seq=4) == ([5, 6], False)
    assert seqs() == ([5, 6], True)  # the newest page, backwards
    assert seqs(before_seq=5) == ([3, 4], True)
    assert seqs(before_seq=3) == ([1, 2], False)
    settings.CHAT_MAX_PAGE_BYTES = 1
    assert seqs(after_seq=0) == ([1], True)
    assert seqs() == ([6], True)


@pytest.mark.parametrize("chunk", [1, 2, 3, 50])
def test_the_store_is_read_a_few_messages_at_a_time_and_pages_are_unchanged(
    conversation, client_for, monkeypatch, chunk
):
    owner, conversation = conversation
    client = client_for(owner)
    for i in range(7):
        send(client, conversation, f"m{i + 1}", message_type="text")
    monkeypatch.setattr(selectors, "HISTORY_READ_CHUNK", chunk)
    store = RecordingStore(get_message_store())
    use_message_store(monkeypatch, store)

    def seqs(**params):
        data = page(client, conversation, **params)
        return [m["seq"] for m in data["results"]], data["has_more"]

    assert seqs() == ([1, 2, 3, 4, 5, 6, 7], False)
    assert seqs(limit=3) == ([5, 6, 7], True)
    assert seqs(before_seq=5, limit=3) == ([2, 3, 4], True)
    assert seqs(before_seq=4, limit=3) == ([1, 2, 3], False)
    assert seqs(after_seq=2, limit=3) == ([3, 4, 5], True)
    assert seqs(after_seq=4, limit=3) == ([5, 6, 7], False)
    assert seqs(after_seq=1, before_seq=5) == ([2, 3, 4], False)
    assert seqs(after_seq=7) == ([], False)
    assert seqs(limit=200) == ([1, 2, 3, 4, 5, 6, 7], False)
    assert max(store.limits) == min(chunk, 200)
