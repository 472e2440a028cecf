"""The WebSocket consumer through the whole ASGI stack (origin check, auth, routing), in process."""
import asyncio
import time
import json
import uuid

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from chat import consumers, events

from chat.fanout import get_fanout
from chat.services import conversations, moderation, send as sending
from chat.store import get_message_store
from chatproject.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


def token_headers(user):
    from accounts.services import token_issue

    _, key = token_issue(user=user)
    return [(b"authorization", f"Token {key}".encode())]


async def open_socket(user, conversation, *, after_seq=None, after_change=None, headers=None, origin=None):
    query = f"conversation_id={conversation.id if hasattr(conversation, 'id') else conversation}"
    if after_seq is not None:
        query += f"&after_seq={after_seq}"
    if after_change is not None:
        query += f"&after_change={after_change}"
    headers = headers if headers is not None else await database_sync_to_async(token_headers)(user)
    if origin:
        headers = headers + [(b"origin", origin.encode())]
    communicator = WebsocketCommunicator(application, f"/ws/chat/?{query}", headers=headers)
    connected, _ = await communicator.connect()
    return communicator, connected


async def receive(communicator, timeout=2, skip=("presence",)):
    """The next frame, passing over presence frames unless a test asks for them."""
    while True:
        frame = json.loads(await communicator.receive_from(timeout=timeout))
        if frame["type"] not in skip:
            return frame


async def expect_close(communicator, code, timeout=1):
    while True:
        output = await communicator.receive_output(timeout=timeout)
        if output["type"] == "websocket.close":
            assert output == {"type": "websocket.close", "code": code}
            return
        assert json.loads(output["text"])["type"] == "presence", output


async def nothing_but_presence(communicator, timeout=0.2):
    while not await communicator.receive_nothing(timeout):
        frame = json.loads(await communicator.receive_from())
        if frame["type"] != "presence":
            return False
    return True


async def receive_messages(communicator, count, timeout=3):
    frames = [await receive(communicator, timeout) for _ in range(count)]
    assert all(frame["type"] == "message.new" for frame in frames), frames
    return [frame["message"] for frame in frames]


@pytest.fixture
def trio(make_user, make_group):
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    return alice, bob, carol, make_group(alice, bob)


async def send_with_its_publish_lost(monkeypatch, sender, conversation, content):
    """A send whose message.new never reaches the channel layer: only the store has it."""
    with monkeypatch.context() as patched:
        patched.setattr(events, "message_new", lambda message: None)
        await send_over_rest_path(sender, conversation, content)


async def send_over_rest_path(user, conversation, content="hi", **kwargs):
    return await database_sync_to_async(sending.message_send)(sending.SendRequest(
        sender=user, conversation_id=conversation.id, content=content, **kwargs
    ))


class TestHandshake:
    async def test_member_connects_and_gets_ready_first(self, trio):
        alice, bob, _, conversation = trio
        await send_over_rest_path(alice, conversation)
        socket, connected = await open_socket(bob, conversation)
        assert connected
        assert await receive(socket) == {
            "type": "ready",
            "conversation_id": str(conversation.id),
            "user_id": str(bob.pk),
            "last_seq": 1,
            "last_change": 0,
            "recovered": True,
        }
        assert await socket.receive_nothing(0.1)
        await socket.disconnect()

    async def test_non_member_is_refused(self, trio):
        from chat import metrics

        before = metrics.websocket_connection_unauthorized._value.get()
        _, connected = await open_socket(trio[2], trio[3])
        assert not connected
        assert metrics.websocket_connection_unauthorized._value.get() == before + 1

    async def test_unknown_and_malformed_conversation_ids_are_refused(self, trio):
        assert not (await open_socket(trio[0], uuid.uuid4()))[1]
        assert not (await open_socket(trio[0], "not-a-uuid"))[1]

    async def test_unauthenticated_and_bad_token_are_refused(self, trio):
        assert not (await open_socket(None, trio[3], headers=[]))[1]
        assert not (await open_socket(None, trio[3], headers=[(b"authorization", b"Token nope")]))[1]

    async def test_banned_member_is_refused(self, trio):
        from chat.models import Ban

        alice, bob, _, conversation = trio
        await database_sync_to_async(Ban.objects.create)(conversation=conversation, user=bob)
        assert not (await open_socket(bob, conversation))[1]

    async def test_foreign_origin_is_refused_and_own_origin_accepted(self, trio):
        alice, _, _, conversation = trio
        assert not (await open_socket(alice, conversation, origin="https://evil.example"))[1]
        socket, connected = await open_socket(alice, conversation, origin="http://localhost:8000")
        assert connected
        await socket.disconnect()

    async def test_a_malformed_origin_is_refused(self, trio):
        alice, _, _, conversation = trio
        # No browser sends it, and urlparse refuses it (ValueError): a refusal, not a 500.
        assert not (await open_socket(alice, conversation, origin="http://[::1"))[1]

    async def test_a_socket_on_another_path_is_refused(self, trio):
        from chat import metrics

        alice, _, _, conversation = trio
        headers = await database_sync_to_async(token_headers)(alice)
        refused = metrics.websocket_connection_unauthorized._value.get()
        paths = (f"/ws/chat?conversation_id={conversation.id}", "/ws/other/", "/ws/chat/x/")
        for path in paths:
            connected, _ = await WebsocketCommunicator(application, path, headers=headers).connect()
            assert not connected, path
        assert metrics.websocket_connection_unauthorized._value.get() == refused + len(paths)  # each counted

    @pytest.mark.parametrize("root_path", ["/chat", "/chat/"])
    async def test_served_under_a_prefix(self, trio, root_path):
        alice, _, _, conversation = trio
        headers = await database_sync_to_async(token_headers)(alice)
        communicator = WebsocketCommunicator(application, f"/chat/ws/chat/?conversation_id={conversation.id}", headers=headers)
        communicator.scope["root_path"] = root_path
        assert (await communicator.connect())[0]
        await communicator.disconnect()

    @pytest.mark.parametrize("path, origin", [
        ("/ws/chat/", "https://evil.example"), ("/ws/chat/", "http://[::1"), ("/ws/other/", None),
    ])
    async def test_a_refusal_needs_no_channel_layer(self, trio, settings, path, origin):
        """With Redis down, a refused handshake is still a refusal (channels' WebsocketDenier opens
        a channel-layer channel first, and died with a 500)."""
        from channels.layers import channel_layers

        settings.CHANNEL_LAYERS = {"default": {
            "BACKEND": "chat.channel_layer.ConcurrentPublishChannelLayer",
            "CONFIG": {"hosts": [{"address": "redis://127.0.0.1:1/0", "socket_connect_timeout": 1}]},
        }}
        channel_layers.backends.clear()
        try:
            alice, _, _, conversation = trio
            headers = await database_sync_to_async(token_headers)(alice)
            if origin:
                headers.append((b"origin", origin.encode()))
            communicator = WebsocketCommunicator(application, f"{path}?conversation_id={conversation.id}", headers=headers)
            connected, _ = await communicator.connect(timeout=5)  # raises if the application died
            assert not connected
        finally:
            channel_layers.backends.clear()

    async def test_one_time_ticket(self, trio):
        from accounts.services import ws_ticket_issue

        alice, _, _, conversation = trio
        ticket = await database_sync_to_async(ws_ticket_issue)(user=alice)
        query = f"/ws/chat/?conversation_id={conversation.id}&ticket={ticket}"
        first = WebsocketCommunicator(application, query)
        assert (await first.connect())[0]
        second = WebsocketCommunicator(application, query)
        assert not (await second.connect())[0]  # burned
        await first.disconnect()

    async def test_per_user_connection_limit(self, trio, settings):
        settings.CHAT_MAX_CONNECTIONS_PER_USER = 2
        alice, bob, _, conversation = trio
        sockets = [(await open_socket(alice, conversation)) for _ in range(3)]
        assert [connected for _, connected in sockets] == [True, True, False]
        other, connected = await open_socket(bob, conversation)
        assert connected
        await sockets[0][0].disconnect()
        again, connected = await open_socket(alice, conversation)
        assert connected  # the slot came back
        for socket in (sockets[1][0], other, again):
            await socket.disconnect()
        assert consumers._open_connections == {}


class TestDelivery:
    async def test_send_acks_the_sender_and_reaches_every_connection(self, trio):
        alice, bob, _, conversation = trio
        a, _ = await open_socket(alice, conversation)
        b1, _ = await open_socket(bob, conversation)
        b2, _ = await open_socket(bob, conversation)
        for socket in (a, b1, b2):
            assert (await receive(socket))["type"] == "ready"
        await a.send_json_to(
            {"type": "message.send", "client_message_id": "c-1", "content": "hello", "metadata": {"x": 1}}
        )
        frames = [await receive(a), await receive(a)]
        ack = next(f for f in frames if f["type"] == "message.ack")
        new = next(f for f in frames if f["type"] == "message.new")
        assert ack["client_message_id"] == "c-1" and ack["message"] == new["message"]
        assert new["message"]["seq"] == 1 and new["message"]["content"] == "hello"
        for socket in (b1, b2):
            assert await receive_messages(socket, 1) == [new["message"]]
            assert await nothing_but_presence(socket, 0.1)
        stored = await database_sync_to_async(get_message_store().get)(conversation.id, 1)
        assert stored.as_dict() == new["message"]
        for socket in (a, b1, b2):
            await socket.disconnect()

    async def test_rest_send_is_delivered(self, trio):
        alice, bob, _, conversation = trio
        b, _ = await open_socket(bob, conversation)
        await receive(b)
        result = await send_over_rest_path(alice, conversation, "over rest")
        assert await receive_messages(b, 1) == [result.message.as_dict()]
        await b.disconnect()

    async def test_many_rapid_messages_arrive_complete_and_in_order(self, trio):
        alice, bob, _, conversation = trio
        b, _ = await open_socket(bob, conversation)
        await receive(b)
        a, _ = await open_socket(alice, conversation)
        await receive(a)
        for i in range(100):
            await a.send_json_to({"type": "message.send", "client_message_id": f"m{i}", "content": str(i)})
        received = await receive_messages(b, 100, timeout=10)
        assert [m["seq"] for m in received] == list(range(1, 101))
        assert [m["content"] for m in received] == [str(i) for i in range(100)]
        page = await database_sync_to_async(get_message_store().history)(conversation.id, after_seq=0, limit=200)
        assert [m.seq for m in page.messages] == list(range(1, 101))
        await a.disconnect()
        await b.disconnect()

    async def test_resume_with_after_seq_replays_then_goes_live(self, trio):
        alice, bob, _, conversation = trio
        for i in range(5):
            await send_over_rest_path(alice, conversation, f"m{i}")
        b, _ = await open_socket(bob, conversation, after_seq=2)
        ready = await receive(b)
        assert (ready["last_seq"], ready["recovered"]) == (5, True)
        assert [m["seq"] for m in await receive_messages(b, 3)] == [3, 4, 5]
        await send_over_rest_path(alice, conversation, "live")
        assert [m["seq"] for m in await receive_messages(b, 1)] == [6]
        await b.disconnect()

    async def test_changes_carry_their_number_live_and_resume_with_after_change(self, trio):
        alice, bob, _, conversation = trio
        for i in range(3):
            await send_over_rest_path(alice, conversation, f"m{i}")
        b, _ = await open_socket(bob, conversation)
        assert (await receive(b))["last_change"] == 0
        await database_sync_to_async(moderation.message_edit)(editor=alice, conversation_id=conversation.id, seq=1, content="M0")
        await database_sync_to_async(moderation.message_delete)(actor=alice, conversation_id=conversation.id, seq=2)
        updated, deleted = await receive(b), await receive(b)
        assert (updated["type"], updated["change"], updated["message"]["content"]) == ("message.updated", 1, "M0")
        assert deleted == {"type": "message.deleted", "conversation_id": str(conversation.id), "seq": 2, "change": 2}
        await b.disconnect()
        # Away: one more edit. Back with both cursors: the message and the changes it missed.
        await database_sync_to_async(moderation.message_edit)(editor=alice, conversation_id=conversation.id, seq=3, content="M2")
        b, _ = await open_socket(bob, conversation, after_seq=3, after_change=1)
        ready = await receive(b)
        assert (ready["last_seq"], ready["last_change"], ready["recovered"]) == (3, 3, True)
        replayed = [await receive(b), await receive(b)]
        assert [(f["type"], f["change"]) for f in replayed] == [("message.deleted", 2), ("message.updated", 3)]
        assert replayed[1]["message"]["content"] == "M2"
        assert await nothing_but_presence(b)
        await b.disconnect()

    async def test_a_change_of_a_message_not_yet_delivered_follows_that_message(self, trio, monkeypatch):
        # The message's publish is lost; its edit arrives: the socket reads the message from the
        # store (as edited) and lets it out first, then the change.
        alice, bob, _, conversation = trio
        b, _ = await open_socket(bob, conversation)
        await receive(b)
        await send_with_its_publish_lost(monkeypatch, alice, conversation, "typo")
        await database_sync_to_async(moderation.message_edit)(editor=alice, conversation_id=conversation.id, seq=1, content="fixed")
        new, updated = await receive(b), await receive(b)
        assert (new["type"], new["message"]["content"]) == ("message.new", "fixed")
        assert (updated["type"], updated["change"]) == ("message.updated", 1)
        await b.disconnect()

    async def test_a_rename_for_user_streams_passes_a_conversation_socket_by(self, trio):
        # conversation.updated goes to the conversation's group, for user streams; the
        # conversation socket carries on.
        alice, bob, _, conversation = trio
        b, _ = await open_socket(bob, conversation)
        await receive(b)
        await database_sync_to_async(conversations.conversation_update)(actor=alice, conversation_id=conversation.id, title="new")
        assert await nothing_but_presence(b)
        await send_over_rest_path(alice, conversation, "still here")
        assert [m["content"] for m in await receive_messages(b, 1)] == ["still here"]
        await b.disconnect()

    async def test_malformed_after_change_is_refused(self, trio):
        _, bob, _, conversation = trio
        for bad in ("-1", "x", "9" * 30):
            _, connected = await open_socket(bob, conversation, after_change=bad)
            assert not connected

    async def test_resume_from_the_future_is_not_recovered_and_goes_live(self, trio):
        alice, bob, _, conversation = trio
        await send_over_rest_path(alice, conversation, "one")
        b, _ = await open_socket(bob, conversation, after_seq=50)
        ready = await receive(b)
        assert (ready["last_seq"], ready["recovered"]) == (1, False)
        await send_over_rest_path(alice, conversation, "two")
        assert [m["seq"] for m in await receive_messages(b, 1)] == [2]
        await b.disconnect()

    async def test_a_failing_frame_costs_the_frame_not_the_connection(self, trio, monkeypatch):
        alice, _, _, conversation = trio
        a, _ = await open_socket(alice, conversation)
        await receive(a)

        def broken(**kwargs):
            raise RuntimeError("bug")

        monkeypatch.setattr(consumers, "read_marker_set", broken)
        await a.send_json_to({"type": "read", "seq": 0})
        assert (await receive(a))["code"] == "unavailable"
        await a.send_json_to({"type": "ping"})
        assert await receive(a) == {"type": "pong"}
        await a.disconnect()

    async def test_a_consumer_that_dies_still_releases_what_it_held(self, trio, monkeypatch):
        alice, _, _, conversation = trio

        def second_check_explodes(asked):  # (the read after subscribing)
            raise RuntimeError("database gone")

        monkeypatch.setattr(consumers, "access_participations", second_check_explodes)
        communicator = WebsocketCommunicator(
            application,
            f"/ws/chat/?conversation_id={conversation.id}",
            headers=await database_sync_to_async(token_headers)(alice),
        )
        with pytest.raises(RuntimeError):
            await communicator.connect()
        assert consumers._open_connections == {}
        assert get_channel_layer().groups.get(events.conversation_group(conversation.id), {}) == {}

    async def test_a_removal_between_the_first_check_and_the_subscription_refuses_the_handshake(self, trio, monkeypatch):
        # Its publish went out before the socket could hear it: the read after subscribing is what finds it.
        from chat.models import Participant

        alice, bob, _, conversation = trio
        first_read = consumers._participations_or_denied

        def removed_right_after(asked):
            participations = first_read(asked)
            Participant.objects.filter(conversation=conversation, user=bob)._raw_delete(Participant.objects.db)
            return participations

        monkeypatch.setattr(
            consumers.ChatConsumer, "read_with_authentication",
            lambda socket: (removed_right_after, consumers._query_param(socket.scope, "conversation_id")),
        )
        communicator = WebsocketCommunicator(
            application,
            f"/ws/chat/?conversation_id={conversation.id}",
            headers=await database_sync_to_async(token_headers)(bob),
        )
        connected, _ = await communicator.connect()
        assert not connected
        assert consumers._open_connections == {}
        assert get_channel_layer().groups.get(events.conversation_group(conversation.id), {}) == {}

    async def test_the_reads_after_subscribing_answer_each_handshake_in_one_statement(self, trio, monkeypatch):
        from chat import sql

        alice, bob, carol, conversation = trio
        statements = []
        real = sql.allowed_participations
        monkeypatch.setattr(sql, "allowed_participations", lambda pairs: statements.append(pairs) or real(pairs))
        asked = [(alice, conversation.id), (carol, conversation.id), (bob, conversation.id), (bob, uuid.uuid4())]
        answers = await consumers._authorize_together(asked)
        assert len(statements) == 1
        assert [type(answer).__name__ for answer in answers] == ["Participation", "AccessDenied", "Participation", "AccessDenied"]
        assert [answer.conversation_id for answer in (answers[0], answers[2])] == [conversation.id, conversation.id]

    async def test_token_handshakes_share_one_read_of_their_tokens_and_of_their_first_check(self, trio, django_assert_num_queries):
        from chat import ws_auth

        alice, bob, carol, conversation = trio
        headers = [await database_sync_to_async(token_headers)(user) for user in (alice, carol, bob)]
        asked = [(h[0][1].decode().split()[1], (consumers._participations_or_denied, str(conversation.id))) for h in headers]
        asked.append(("no-such-token", asked[0][1]))
        asked.append((asked[2][0], (consumers._participations_or_denied, "not-a-uuid")))

        def together():
            with django_assert_num_queries(2):  # the tokens, then the membership rule for all of them
                return ws_auth._tokens_and_reads(asked)

        answers = await database_sync_to_async(together)()
        assert [user.username if user.is_authenticated else None for user, _ in answers] == ["alice", "carol", "bob", None, "bob"]
        assert [type(read).__name__ for _, read in answers] == ["Participation", "AccessDenied", "Participation", "NoneType", "AccessDenied"]

    async def test_token_handshakes_that_arrive_together_share_a_trip(self, trio, monkeypatch):
        from accounts import auth

        alice, bob, _, conversation = trio
        users = (alice, bob, alice, bob, alice)
        headers = [await database_sync_to_async(token_headers)(user) for user in users]
        batches = []
        real = auth.users_for_tokens

        def slow_first(keys):
            batches.append(len(keys))
            if len(batches) == 1:
                time.sleep(0.3)  # the other handshakes arrive meanwhile
            return real(keys)

        monkeypatch.setattr(auth, "users_for_tokens", slow_first)
        sockets = await asyncio.gather(*(open_socket(u, conversation, headers=h) for u, h in zip(users, headers)))
        assert all(connected for _, connected in sockets)
        # Those that reached the batcher together went in the first trip, the rest in the next.
        assert sum(batches) == 5 and len(batches) <= 2
        for socket, _ in sockets:
            await socket.disconnect()

    async def test_resume_beyond_max_replay_is_not_recovered(self, trio, settings):
        settings.CHAT_MAX_REPLAY = 3
        alice, bob, _, conversation = trio
        for i in range(5):
            await send_over_rest_path(alice, conversation, f"m{i}")
        b, _ = await open_socket(bob, conversation, after_seq=1)
        ready = await receive(b)
        assert (ready["last_seq"], ready["recovered"]) == (5, False)
        assert await b.receive_nothing(0.2)
        await b.disconnect()

    async def test_lost_publish_is_filled_from_the_store(self, trio, monkeypatch):
        alice, bob, _, conversation = trio
        b, _ = await open_socket(bob, conversation)
        await receive(b)
        real = events._apublish_to

        async def lose_first(group, event):
            if event.get("type") == "message.new" and event["message"]["seq"] == 1:
                return False
            return await real(group, event)

        monkeypatch.setattr(events, "_apublish_to", lose_first)
        await send_over_rest_path(alice, conversation, "lost")
        await send_over_rest_path(alice, conversation, "arrives")
        assert [m["content"] for m in await receive_messages(b, 2)] == ["lost", "arrives"]
        await b.disconnect()

    async def test_out_of_order_publishes_are_delivered_in_seq_order(self, trio, monkeypatch):
        from chat import metrics

        alice, bob, _, conversation = trio
        b, _ = await open_socket(bob, conversation)
        await receive(b)
        # The sends' own publishes are lost, so the only copies that reach the socket are the ones
        # published below, in reverse: 2 must wait for 1.
        monkeypatch.setattr(events, "message_new", lambda message: False)
        first = await send_over_rest_path(alice, conversation, "one")
        second = await send_over_rest_path(alice, conversation, "two")
        group = events.conversation_group(conversation.id)
        fills_before = metrics.gap_fills._value.get()
        await events._apublish_to(group, {"type": "message.new", "message": second.message.as_dict()})
        await events._apublish_to(group, {"type": "message.new", "message": first.message.as_dict()})
        assert [m["content"] for m in await receive_messages(b, 1)] == ["one"]
        assert [m["content"] for m in await receive_messages(b, 1)] == ["two"]
        assert metrics.gap_fills._value.get() == fills_before  # reordered, not read from the store
        # The same messages published again: duplicates must not reach the client.
        await events._apublish_to(group, {"type": "message.new", "message": first.message.as_dict()})
        await events._apublish_to(group, {"type": "message.new", "message": second.message.as_dict()})
        assert await nothing_but_presence(b, 0.3)
        await b.disconnect()

    async def test_removed_participant_is_closed_with_4403(self, trio):
        alice, bob, _, conversation = trio
        b, _ = await open_socket(bob, conversation)
        await receive(b)
        await database_sync_to_async(conversations.participant_remove)(
            actor=alice, conversation_id=conversation.id, user_id=bob.pk
        )
        await expect_close(b, 4403, timeout=2)
        await b.disconnect(code=4403)  # what the server's transport reports once the socket is closed

    async def test_connect_disconnect_churn_leaves_no_group_membership(self, trio):
        alice, bob, _, conversation = trio
        group = events.conversation_group(conversation.id)
        for _ in range(20):
            socket, connected = await open_socket(bob, conversation)
            assert connected
            await socket.disconnect()
        layer = get_channel_layer()
        assert layer.groups.get(group, {}) == {}
        assert layer.groups.get(events.ACCOUNTS_GROUP, {}) == {}
        assert get_fanout().listeners == {} and get_fanout().accounts == {}
        assert consumers._open_connections == {}

    async def test_sockets_of_every_user_share_one_subscription_for_account_revocations(self, trio):
        """Deactivation and password changes reach the process once, on one group, and go to that
        account's sockets only (test_deactivation_closes_every_socket_of_the_user): a socket holds
        no subscription of its own for its user."""
        alice, bob, _, conversation = trio
        sockets = [(await open_socket(user, conversation))[0] for user in (alice, bob, bob)]
        for socket in sockets:
            await receive(socket)
        layer, fanout = get_channel_layer(), get_fanout()
        assert set(fanout.listeners) == {events.conversation_group(conversation.id), events.ACCOUNTS_GROUP}
        assert list(layer.groups[events.ACCOUNTS_GROUP]) == [fanout.channel]
        assert not [group for group in layer.groups if group.startswith("user.")]
        assert {user: len(listeners) for user, listeners in fanout.accounts.items()} == {str(alice.pk): 1, str(bob.pk): 2}
        for socket in sockets:
            await socket.disconnect()
        assert fanout.accounts == {} and events.ACCOUNTS_GROUP not in layer.groups


class TestFrames:
    @pytest.fixture
    async def socket(self, trio):
        socket, _ = await open_socket(trio[0], trio[3])
        await receive(socket)
        yield socket
        await socket.disconnect()

    @pytest.mark.parametrize(
        "raw, code",
        [
            ("not json", "bad_request"),
            ("[1, 2]", "bad_request"),
            ('{"type": 5}', "bad_request"),
            ('{"type": "dance"}', "bad_request"),
            ('{"type": "message.send", "content": ""}', "validation_error"),
            ('{"type": "message.send", "content": "x", "message_type": "gif"}', "validation_error"),
            ('{"type": "message.send", "content": "x", "client_message_id": ""}', "validation_error"),
            ('{"type": "message.send", "content": "x", "client_message_id": 7}', "validation_error"),
            ('{"type": "read", "seq": -1}', "validation_error"),
            ('{"type": "read", "seq": "1"}', "validation_error"),
        ],
    )
    async def test_malformed_frames_get_error_frames_and_the_connection_stays(self, socket, raw, code):
        await socket.send_to(text_data=raw)
        frame = await receive(socket)
        assert (frame["type"], frame["code"]) == ("error", code)
        await socket.send_json_to({"type": "ping"})
        assert await receive(socket) == {"type": "pong"}

    async def test_binary_frames_are_refused(self, socket):
        await socket.send_to(bytes_data=b"\x00\x01")
        assert (await receive(socket))["code"] == "bad_request"

    async def test_frame_size_limit(self, socket):
        envelope = '{"type":"message.send","message_type":"file","content":""}'
        just_inside = envelope.replace('""', '"' + "x" * (consumers.MAX_INBOUND_FRAME_BYTES - len(envelope)) + '"')
        assert len(just_inside.encode()) == consumers.MAX_INBOUND_FRAME_BYTES
        await socket.send_to(text_data=just_inside)
        frames = [await receive(socket), await receive(socket)]
        assert {f["type"] for f in frames} == {"message.ack", "message.new"}
        await socket.send_to(text_data=just_inside.replace('"x', '"xx'))
        frame = await receive(socket)
        assert (frame["type"], frame["code"]) == ("error", "bad_request")
        assert "1 MiB" in frame["detail"]

    async def test_validation_error_names_the_field_and_echoes_the_client_message_id(self, socket):
        await socket.send_json_to({"type": "message.send", "client_message_id": "c9", "content": "x" * 10_001})
        frame = await receive(socket)
        assert frame["client_message_id"] == "c9" and list(frame["fields"]) == ["content"]

    async def test_rate_limited_send_gets_an_error_frame(self, socket, settings):
        settings.CHAT_SEND_RATE = "1/min"
        await socket.send_json_to({"type": "message.send", "client_message_id": "a", "content": "x"})
        await receive(socket), await receive(socket)
        await socket.send_json_to({"type": "message.send", "client_message_id": "b", "content": "x"})
        frame = await receive(socket)
        assert (frame["code"], frame["client_message_id"]) == ("rate_limited", "b")

    async def test_typing_reaches_others_not_self(self, trio):
        alice, bob, _, conversation = trio
        a, _ = await open_socket(alice, conversation)
        b, _ = await open_socket(bob, conversation)
        await receive(a), await receive(b)
        await a.send_json_to({"type": "typing"})
        assert await receive(b) == {"type": "typing", "conversation_id": str(conversation.id), "user_id": str(alice.pk)}
        assert await nothing_but_presence(a)
        await a.disconnect()
        await b.disconnect()

    async def test_read_marker_is_broadcast(self, trio):
        alice, bob, _, conversation = trio
        await send_over_rest_path(alice, conversation)
        a, _ = await open_socket(alice, conversation)
        b, _ = await open_socket(bob, conversation)
        await receive(a), await receive(b)
        await b.send_json_to({"type": "read", "seq": 1})
        assert await receive(a) == {"type": "read", "conversation_id": str(conversation.id), "user_id": str(bob.pk), "seq": 1}
        await a.disconnect()
        await b.disconnect()


class TestRevocation:
    async def test_ban_closes_the_sockets_within_a_second(self, trio):
        alice, bob, _, conversation = trio
        b, _ = await open_socket(bob, conversation)
        await receive(b)
        started = asyncio.get_running_loop().time()
        await database_sync_to_async(conversations.ban_create)(actor=alice, conversation=conversation, user=bob)
        await expect_close(b, 4403)
        assert asyncio.get_running_loop().time() - started < 1
        await b.disconnect(code=4403)
        assert not (await open_socket(bob, conversation))[1]

    async def test_deactivation_closes_every_socket_of_the_user(self, trio, make_group):
        from accounts.services import user_deactivate

        alice, bob, carol, conversation = trio
        other = await database_sync_to_async(make_group)(carol, bob)
        on_first, _ = await open_socket(bob, conversation)
        on_second, _ = await open_socket(bob, other)
        bystander, _ = await open_socket(alice, conversation)
        for socket in (on_first, on_second, bystander):
            await receive(socket)
        started = asyncio.get_running_loop().time()
        await database_sync_to_async(user_deactivate)(user=bob)
        for socket in (on_first, on_second):
            await expect_close(socket, 4403)
            await socket.disconnect(code=4403)
        assert asyncio.get_running_loop().time() - started < 1  # the event, not a re-check
        assert await nothing_but_presence(bystander)
        await bystander.disconnect()

    async def test_a_password_change_closes_every_socket_of_the_account_and_only_those(self, trio):
        """The one revocation the membership rule cannot see: only its event (chat.events.
        ACCOUNTS_GROUP, routed by the process's fan-out to the account's sockets) closes them."""
        from accounts.services import password_change
        from tests.chat.test_user_stream import open_stream

        alice, bob, _, conversation = trio
        conversation_socket, _ = await open_socket(bob, conversation)
        stream, _ = await open_stream(bob)  # (its ready frame read)
        bystander, _ = await open_socket(alice, conversation)
        for socket in (conversation_socket, bystander):
            await receive(socket)
        await database_sync_to_async(password_change)(user=bob, new_password="another long passphrase 42")
        for socket in (conversation_socket, stream):
            await expect_close(socket, 4403)
            await socket.disconnect(code=4403)
        assert await nothing_but_presence(bystander)
        await bystander.disconnect()
        assert get_fanout().accounts == {}


class TestPresence:
    async def test_online_and_offline_per_conversation(self, trio):
        alice, bob, _, conversation = trio
        a, _ = await open_socket(alice, conversation)
        await receive(a)
        b1, _ = await open_socket(bob, conversation)
        await receive(b1)
        online = {"type": "presence", "conversation_id": str(conversation.id), "user_id": str(bob.pk), "online": True}
        assert await receive(a, skip=()) == online
        assert await receive(b1, skip=()) == {
            "type": "presence", "conversation_id": str(conversation.id), "user_id": str(alice.pk), "online": True
        }
        b2, _ = await open_socket(bob, conversation)  # a second device: no new event
        await receive(b2)
        await b1.disconnect()
        assert await a.receive_nothing(0.2)
        await b2.disconnect()  # the last one: offline
        assert await receive(a, skip=()) == {
            "type": "presence", "conversation_id": str(conversation.id), "user_id": str(bob.pk), "online": False
        }
        await a.disconnect()

    @staticmethod
    async def alice_sees_bob_online(alice, bob, conversation):
        """Alice's and bob's sockets on the conversation, once alice was told bob is online."""
        a, _ = await open_socket(alice, conversation)
        await receive(a)
        b, _ = await open_socket(bob, conversation)
        await receive(b)
        assert (await receive(a, skip=()))["online"] is True
        return a, b

    async def test_an_application_cancelled_while_the_server_runs_on_announces_its_user_offline(self, trio):
        """daphne also cancels one connection's application (one that did not end in time after its
        client left): that is no shutdown, and its user goes offline as on any disconnect."""
        alice, bob, _, conversation = trio
        a, b = await self.alice_sees_bob_online(alice, bob, conversation)
        b.future.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b.future
        assert await receive(a, skip=()) == {
            "type": "presence", "conversation_id": str(conversation.id), "user_id": str(bob.pk), "online": False
        }
        await a.disconnect()

    async def test_sockets_ended_by_the_servers_shutdown_announce_nothing(self, trio, monkeypatch):
        """A restart is no presence change (chat.presence.SHUTDOWN_GRACE_SECONDS)."""
        from core import transport

        alice, bob, _, conversation = trio
        a, b = await self.alice_sees_bob_online(alice, bob, conversation)
        monkeypatch.setattr(transport, "_shutting_down", True)
        await b.disconnect()
        assert await a.receive_nothing(0.3)
        await a.disconnect()


async def test_under_daphne_a_socket_writes_its_frames_through_daphnes_write(settings):
    """With daphne's synchronous write at hand (consumers.socket_writer; the in-process
    communicator has none), a frame goes straight to it; one it refuses (the connection is gone)
    costs that frame, counted; one over the transport's cap becomes the error frame, as on `send`."""
    from chat import metrics

    written, accepting = [], [True]

    def write_now(text):
        written.append(json.loads(text))
        return accepting[0]

    socket = consumers.ChatConsumer()
    socket.write_now, socket.backlog_probe = write_now, lambda: 0

    async def no_send(**kwargs):
        raise AssertionError("channels' send must not be used when daphne's write is at hand")

    socket.send = no_send
    await socket._send_json({"type": "pong"})
    assert written == [{"type": "pong"}]
    dropped = metrics.client_message_dropped._value.get()
    accepting[0] = False
    await socket._send_json({"type": "pong"})
    assert metrics.client_message_dropped._value.get() == dropped + 1
    accepting[0] = True
    settings.CHAT_MAX_FRAME_BYTES = 1024
    await socket._send_json({"type": "typing", "padding": "x" * 2000})
    assert (written[-1]["type"], written[-1]["code"], written[-1]["dropped"]) == ("error", "unavailable", {"type": "typing"})
