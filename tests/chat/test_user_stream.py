"""The user stream (SPEC section 5): ws/chat/ without conversation_id carries every conversation of
the user, through the whole ASGI stack, in process. The multi-process guarantee is tested on real
servers in tests/test_user_stream_live.py."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from accounts.services import user_deactivate
from chat import events, recheck
from chat.channel_layer import RESUBSCRIBED
from chat.fanout import get_fanout
from chat.models import Ban, Participant
from chat.services import conversations, moderation
from chatproject.asgi import application
from tests.chat.test_consumer import (
    expect_close,
    open_socket,
    receive,
    send_over_rest_path,
    send_with_its_publish_lost,
    token_headers,
)

pytestmark = pytest.mark.django_db(transaction=True)


async def open_stream(user, query=""):
    headers = await database_sync_to_async(token_headers)(user)
    communicator = WebsocketCommunicator(application, f"/ws/chat/{query}", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    ready = await receive(communicator)
    assert ready["type"] == "ready", ready
    return communicator, ready


async def quiet(communicator, timeout=0.3) -> bool:
    """Nothing but presence arrives within `timeout`."""
    while not await communicator.receive_nothing(timeout):
        frame = json.loads(await communicator.receive_from())
        if frame["type"] != "presence":
            return False
    return True


@pytest.fixture
def team(make_user, make_group):
    """alice owns two groups with bob; carol is in neither."""
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    return alice, bob, carol, make_group(alice, bob, title="one"), make_group(alice, bob, title="two")


create_group = database_sync_to_async(lambda owner, *members, title="g": conversations.conversation_create(
    creator=owner, kind="group", title=title, participant_ids=[m.pk for m in members]
)[0])
add = database_sync_to_async(lambda actor, conversation, user: conversations.participant_add(
    actor=actor, conversation_id=conversation.id, user_id=user.pk
))
remove = database_sync_to_async(lambda actor, conversation, user: conversations.participant_remove(
    actor=actor, conversation_id=conversation.id, user_id=user.pk
))


class TestReady:
    async def test_ready_lists_every_conversation_and_frames_name_theirs(self, team):
        alice, bob, _, one, two = team
        await send_over_rest_path(alice, one, "before")
        stream, ready = await open_stream(bob)
        assert ready == {
            "type": "ready",
            "user_id": str(bob.pk),
            "conversations": {str(one.id): {"last_seq": 1, "last_change": 0}, str(two.id): {"last_seq": 0, "last_change": 0}},
            "truncated": False,
        }
        await send_over_rest_path(alice, two, "in two")
        await send_over_rest_path(alice, one, "in one")
        frames = [await receive(stream), await receive(stream)]
        assert [(f["type"], f["conversation_id"], f["message"]["seq"]) for f in frames] == [
            ("message.new", str(two.id), 1), ("message.new", str(one.id), 2)
        ]
        await stream.disconnect()

    async def test_ready_is_bounded_to_the_most_recently_active(self, team, settings):
        alice, bob, _, one, two = team
        settings.CHAT_STREAM_MAX_CONVERSATIONS = 1
        await send_over_rest_path(alice, one, "one is the most recent")
        stream, ready = await open_stream(bob)
        assert list(ready["conversations"]) == [str(one.id)] and ready["truncated"] is True
        await send_over_rest_path(alice, two, "not carried")
        assert await quiet(stream)
        await stream.disconnect()

    async def test_a_user_in_no_conversation_gets_an_empty_ready(self, team):
        _, _, carol, _, _ = team
        stream, ready = await open_stream(carol)
        assert ready["conversations"] == {} and ready["truncated"] is False
        await stream.disconnect()

    async def test_one_subscription_per_conversation_per_process(self, team):
        alice, bob, _, one, _ = team
        streams = [(await open_stream(user))[0] for user in (alice, bob, bob)]
        socket, _ = await open_socket(alice, one)
        await receive(socket)
        fanout = get_fanout()
        group = events.conversation_group(one.id)
        assert len(fanout.listeners[group]) == 4
        assert list(fanout.layer.groups[group]) == [fanout.channel]  # the layer knows one channel
        for communicator in (*streams, socket):
            await communicator.disconnect()
        assert group not in fanout.listeners

    async def test_unauthenticated_is_refused(self):
        communicator = WebsocketCommunicator(application, "/ws/chat/")
        connected, _ = await communicator.connect()
        assert not connected


class TestClientFrames:
    async def test_send_typing_and_read_name_their_conversation(self, team):
        alice, bob, _, one, two = team
        a, _ = await open_stream(alice)
        b, _ = await open_stream(bob)
        await b.send_json_to({"type": "message.send", "conversation_id": str(two.id), "client_message_id": "c1", "content": "hi"})
        frames = {frame["type"]: frame for frame in [await receive(b), await receive(b)]}  # in either order
        ack, new = frames["message.ack"], frames["message.new"]
        assert (ack["conversation_id"], ack["client_message_id"]) == (str(two.id), "c1")
        assert new["conversation_id"] == str(two.id)
        assert (await receive(a))["message"]["content"] == "hi"
        await b.send_json_to({"type": "typing", "conversation_id": str(two.id)})
        assert await receive(a) == {"type": "typing", "conversation_id": str(two.id), "user_id": str(bob.pk)}
        await a.send_json_to({"type": "read", "conversation_id": str(two.id), "seq": 1})
        assert await receive(b) == {"type": "read", "conversation_id": str(two.id), "user_id": str(alice.pk), "seq": 1}
        await a.disconnect()
        await b.disconnect()

    @pytest.mark.parametrize("frame_type", ["message.send", "typing", "read"])
    async def test_a_conversation_not_the_users_is_forbidden_whatever_it_is(self, team, make_group, frame_type):
        alice, bob, carol, one, _ = team
        theirs = await database_sync_to_async(make_group)(alice, carol, title="not bob's")
        b, _ = await open_stream(bob)
        for conversation_id in (str(theirs.id), str(uuid.uuid4()), "not-a-uuid", None):
            frame = {"type": frame_type, "client_message_id": "x", "content": "x", "seq": 0}
            if conversation_id is not None:
                frame["conversation_id"] = conversation_id
            await b.send_json_to(frame)
            error = await receive(b)
            assert (error["type"], error["code"]) == ("error", "forbidden"), (conversation_id, error)
        assert await quiet(b)
        await b.disconnect()


class TestMembership:
    async def test_added_to_and_creating_a_conversation_joins_it_live(self, team, make_user):
        alice, bob, carol, one, _ = team
        c, ready = await open_stream(carol)
        assert ready["conversations"] == {}
        await send_over_rest_path(alice, one, "before carol")
        await add(alice, one, carol)
        joined = await receive(c)
        assert (joined["type"], joined["conversation_id"], joined["last_seq"], joined["last_change"]) == (
            "conversation.joined", str(one.id), 1, 0
        )
        assert joined["conversation"]["id"] == str(one.id) and joined["conversation"]["title"] == "one"
        await send_over_rest_path(alice, one, "after carol")
        assert (await receive(c))["message"]["content"] == "after carol"

        dave = await database_sync_to_async(make_user)("dave")
        created = await create_group(carol, dave, title="carol's")
        joined = await receive(c)
        assert (joined["type"], joined["conversation_id"], joined["last_seq"]) == ("conversation.joined", str(created.id), 0)
        await c.disconnect()

    async def test_a_join_lost_with_redis_is_joined_when_the_subscriptions_are_back(self, team, monkeypatch):
        alice, bob, carol, one, _ = team
        c, ready = await open_stream(carol)
        assert ready["conversations"] == {}
        await send_over_rest_path(alice, one, "before carol")
        with monkeypatch.context() as lost:
            lost.setattr(events, "conversation_joined", lambda *args, **kwargs: None)
            await add(alice, one, carol)
            await send_over_rest_path(alice, one, "while the join was lost")
        assert await quiet(c)
        # The channel layer says its subscriptions were made again (chat.channel_layer).
        fanout = get_fanout()
        await fanout.layer.send(fanout.channel, {"type": RESUBSCRIBED})
        joined = await receive(c)
        # From where the conversation stands now: what came before is the conversation's history.
        assert (joined["type"], joined["conversation_id"], joined["last_seq"], joined["last_change"]) == (
            "conversation.joined", str(one.id), 2, 0
        )
        assert joined["conversation"]["title"] == "one"
        await send_over_rest_path(alice, one, "after the resubscription")
        assert (await receive(c))["message"]["content"] == "after the resubscription"
        # Told again, it joins nothing twice.
        await fanout.layer.send(fanout.channel, {"type": RESUBSCRIBED})
        assert await quiet(c)
        await c.disconnect()

    async def test_removal_leave_and_ban_say_why_and_nothing_follows(self, team, make_group):
        alice, bob, carol, one, two = team
        third = await database_sync_to_async(make_group)(alice, bob, title="three")
        b, _ = await open_stream(bob)
        await send_over_rest_path(alice, one, "last one bob sees")
        assert (await receive(b))["message"]["content"] == "last one bob sees"
        await remove(alice, one, bob)
        assert await receive(b) == {"type": "conversation.left", "conversation_id": str(one.id), "reason": "removed"}
        await remove(bob, two, bob)
        assert await receive(b) == {"type": "conversation.left", "conversation_id": str(two.id), "reason": "left"}
        await database_sync_to_async(conversations.ban_create)(actor=alice, conversation=third, user=bob)
        assert await receive(b) == {"type": "conversation.left", "conversation_id": str(third.id), "reason": "banned"}
        for conversation in (one, two, third):
            await send_over_rest_path(alice, conversation, "bob is gone")
        assert await quiet(b)
        # The socket stays open.
        await b.send_json_to({"type": "ping"})
        assert await receive(b) == {"type": "pong"}
        # A lifted ban gives the conversation back.
        await database_sync_to_async(Ban.objects.filter(conversation=third, user=bob).delete)()
        joined = await receive(b)
        assert (joined["type"], joined["conversation_id"], joined["last_seq"]) == ("conversation.joined", str(third.id), 1)
        await b.disconnect()

    async def test_messages_committed_before_a_removal_arrive_before_its_left(self, team, monkeypatch):
        # The message's own publish is lost: the stream reads it from the store before it says
        # conversation.left, because the left carries where the conversation stood.
        alice, bob, _, one, _ = team
        b, _ = await open_stream(bob)
        await send_with_its_publish_lost(monkeypatch, alice, one, "sent while bob was a member")
        await remove(alice, one, bob)
        new, left = await receive(b), await receive(b)
        assert (new["type"], new["message"]["content"]) == ("message.new", "sent while bob was a member")
        assert (left["type"], left["reason"]) == ("conversation.left", "removed")
        await b.disconnect()

    async def test_joins_beyond_the_limit_are_announced_not_carried(self, team, settings, make_user):
        alice, bob, carol, one, two = team
        settings.CHAT_STREAM_MAX_CONVERSATIONS = 2
        b, ready = await open_stream(bob)
        assert len(ready["conversations"]) == 2
        third = await create_group(carol, bob, title="one too many")
        joined = await receive(b)
        assert (joined["type"], joined["conversation_id"], joined["carried"]) == ("conversation.joined", str(third.id), False)
        await send_over_rest_path(carol, third, "read it over REST")
        assert await quiet(b)
        await b.disconnect()

    async def test_a_rejoin_whose_event_overtook_the_leave_is_not_lost(self, team, monkeypatch):
        # Two processes: bob's removal and his re-adding are published by different ones, and the
        # join's event arrives first (passed over: the stream still carries the conversation).
        alice, bob, _, one, _ = team
        b, _ = await open_stream(bob)
        held: list[tuple[str, dict]] = []
        real = events._apublish_to

        async def hold_the_leave(group, event):
            if event.get("type") == "conversation.left":
                held.append((group, event))
                return True
            return await real(group, event)

        monkeypatch.setattr(events, "_apublish_to", hold_the_leave)
        await remove(alice, one, bob)
        await add(alice, one, bob)
        monkeypatch.undo()
        await events._apublish_to(*held[0])  # the leave, late
        left, joined = await receive(b), await receive(b)
        assert (left["type"], joined["type"], joined["conversation_id"]) == ("conversation.left", "conversation.joined", str(one.id))
        await send_over_rest_path(alice, one, "bob is back")
        assert (await receive(b))["message"]["content"] == "bob is back"
        await b.disconnect()

    async def test_title_change_is_announced(self, team):
        alice, bob, _, one, _ = team
        b, _ = await open_stream(bob)
        await database_sync_to_async(conversations.conversation_update)(actor=alice, conversation_id=one.id, title="renamed")
        frame = await receive(b)
        assert (frame["type"], frame["conversation_id"], frame["conversation"]["title"]) == (
            "conversation.updated", str(one.id), "renamed"
        )
        await b.disconnect()

    async def test_deactivation_closes_the_stream_with_4403(self, team):
        _, bob, _, _, _ = team
        b, _ = await open_stream(bob)
        await database_sync_to_async(user_deactivate)(user=bob)
        await expect_close(b, 4403)

    async def test_a_revocation_that_announced_nothing_is_found_by_the_recheck(self, team, monkeypatch):
        alice, bob, _, one, _ = team
        b, _ = await open_stream(bob)
        # Deleted without signals: nothing is published (a raw delete from a shell).
        await database_sync_to_async(
            lambda: Participant.objects.filter(conversation=one, user=bob)._raw_delete(Participant.objects.db)
        )()
        # The stream's own read of the rule is slow today: events that arrive meanwhile wait.
        from chat import consumers

        read = consumers.stream_standings
        monkeypatch.setattr(consumers, "stream_standings", lambda **kw: time.sleep(0.5) or read(**kw))
        assert await recheck.recheck_once() >= 1
        # Sent the moment the re-check has found the access gone (as after a Redis restart, when
        # the fan-out delivers again once the re-check returns): it must not go out.
        await send_over_rest_path(alice, one, "after the removal")
        assert await receive(b) == {"type": "conversation.left", "conversation_id": str(one.id), "reason": "removed"}
        assert await quiet(b)
        await b.disconnect()


    async def test_a_lost_conversation_is_left_when_the_stream_cannot_read_why(self, team, monkeypatch):
        """The re-check found the access gone and stopped watching: the stream's own read failing
        must not leave the conversation carried and unwatched."""
        alice, bob, _, one, _ = team
        b, _ = await open_stream(bob)
        await database_sync_to_async(
            lambda: Participant.objects.filter(conversation=one, user=bob)._raw_delete(Participant.objects.db)
        )()
        from chat import consumers

        def unreadable(**kwargs):
            raise ConnectionError("database away")

        monkeypatch.setattr(consumers, "stream_standings", unreadable)
        assert await recheck.recheck_once() >= 1
        await send_over_rest_path(alice, one, "after the removal")
        assert await receive(b) == {"type": "conversation.left", "conversation_id": str(one.id), "reason": "removed"}
        assert await quiet(b)
        await b.disconnect()

    async def test_a_conversation_found_allowed_again_is_watched_again(self, team):
        _, bob, _, one, _ = team
        b, _ = await open_stream(bob)
        [stream] = get_fanout().listeners[events.user_group(bob.pk)]
        watch = stream.watched[one.id]
        # As when the re-check found it without access and the access came back before the
        # stream's own read (re-added, or the ban lifted).
        recheck.unwatch(watch)
        stream.reconcile(one.id)
        participant_id = await database_sync_to_async(lambda: Participant.objects.get(conversation=one, user=bob).pk)()
        for _ in range(100):
            if recheck._sockets.get(watch) == participant_id:
                break
            await asyncio.sleep(0.01)
        assert recheck._sockets.get(watch) == participant_id
        assert one.id in stream.feeds
        await b.disconnect()


class TestResume:
    async def test_resume_replays_messages_and_changes_then_says_resumed(self, team):
        alice, bob, _, one, two = team
        for text in ("a", "b", "c"):
            await send_over_rest_path(alice, one, text)
        await database_sync_to_async(moderation.message_edit)(editor=alice, conversation_id=one.id, seq=1, content="A")
        b, ready = await open_stream(bob)
        assert ready["conversations"][str(one.id)] == {"last_seq": 3, "last_change": 1}
        # The client had seq 1 and no change of `one`, and everything of `two`.
        await b.send_json_to({"type": "resume", "cursors": {str(one.id): {"seq": 1, "change": 0}, str(two.id): {"seq": 0}}})
        frames = [await receive(b) for _ in range(4)]
        assert [(f["type"], f.get("message", {}).get("seq"), f.get("change")) for f in frames] == [
            ("message.new", 2, None), ("message.new", 3, None), ("message.updated", 1, 1), ("resumed", None, None)
        ]
        assert frames[-1]["conversations"] == {str(one.id): {"recovered": True}, str(two.id): {"recovered": True}}
        await send_over_rest_path(alice, one, "live")
        assert (await receive(b))["message"]["seq"] == 4
        await b.disconnect()

    async def test_with_resume_1_live_events_wait_for_the_resume(self, team):
        # A message sent between ready and the resume frame goes out after the replay.
        alice, bob, _, one, _ = team
        for text in ("a", "b"):
            await send_over_rest_path(alice, one, text)
        b, ready = await open_stream(bob, "?resume=1")
        assert ready["conversations"][str(one.id)]["last_seq"] == 2
        await send_over_rest_path(alice, one, "live, sent before the resume")
        assert await quiet(b)
        await b.send_json_to({"type": "resume", "cursors": {str(one.id): {"seq": 0}}})
        frames = [await receive(b) for _ in range(4)]
        assert [(f["type"], f.get("message", {}).get("seq")) for f in frames] == [
            ("message.new", 1), ("message.new", 2), ("resumed", None), ("message.new", 3)
        ]
        await b.disconnect()

    async def test_the_resume_wait_running_out_during_a_resume_does_not_let_live_events_ahead(self, team, monkeypatch):
        # ?resume=1's wait ends while the resume frame is still being answered (its read is slow,
        # as in a reconnect storm): live events still wait for the replay.
        from chat import consumers

        alice, bob, _, one, _ = team
        await send_over_rest_path(alice, one, "a")
        monkeypatch.setattr(consumers, "RESUME_WAIT_SECONDS", 0.2)
        standings = consumers.stream_standings

        def slow_standings(**kwargs):
            import time

            time.sleep(0.5)
            return standings(**kwargs)

        b, _ = await open_stream(bob, "?resume=1")
        monkeypatch.setattr(consumers, "stream_standings", slow_standings)
        await b.send_json_to({"type": "resume", "cursors": {str(one.id): {"seq": 0}}})
        await asyncio.sleep(0.3)  # the wait is over; the resume's read is not
        await send_over_rest_path(alice, one, "live")
        frames = [await receive(b) for _ in range(3)]
        assert [(f["type"], f.get("message", {}).get("seq")) for f in frames] == [
            ("message.new", 1), ("resumed", None), ("message.new", 2)
        ]
        await b.disconnect()

    async def test_unknown_and_foreign_conversations_get_the_same_forbidden(self, team, make_group):
        alice, bob, carol, _, _ = team
        theirs = await database_sync_to_async(make_group)(alice, carol, title="not bob's")
        await send_over_rest_path(alice, theirs, "secret")
        b, _ = await open_stream(bob)
        unknown = uuid.uuid4()
        await b.send_json_to({"type": "resume", "cursors": {str(theirs.id): {"seq": 0}, str(unknown): {"seq": 0}}})
        resumed = await receive(b)
        assert resumed == {
            "type": "resumed",
            "conversations": {
                str(theirs.id): {"recovered": False, "forbidden": True},
                str(unknown): {"recovered": False, "forbidden": True},
            },
        }
        assert await quiet(b)
        await b.disconnect()

    @pytest.mark.parametrize(
        "cursors",
        [
            None,
            [],
            "x",
            {"not-a-uuid": {"seq": 0}},
            {"ONE": {"seq": -1}},
            {"ONE": {"seq": "1"}},
            {"ONE": {"seq": True}},
            {"ONE": {"seq": 2**70}},
            {"ONE": {"seq": 0, "extra": 1}},
            {"ONE": 5},
        ],
    )
    async def test_a_malformed_resume_is_bad_request_and_changes_nothing(self, team, cursors):
        alice, bob, _, one, _ = team
        await send_over_rest_path(alice, one, "a")
        b, _ = await open_stream(bob)
        if isinstance(cursors, dict):
            cursors = {key.replace("ONE", str(one.id)): value for key, value in cursors.items()}
        await b.send_json_to({"type": "resume", "cursors": cursors})
        error = await receive(b)
        assert (error["type"], error["code"]) == ("error", "bad_request"), error
        assert await quiet(b)
        await send_over_rest_path(alice, one, "live")
        assert (await receive(b))["message"]["seq"] == 2
        await b.disconnect()

    async def test_too_many_conversations_in_a_resume_is_bad_request(self, team, settings):
        _, bob, _, one, two = team
        settings.CHAT_MAX_RESUME_CONVERSATIONS = 1
        b, _ = await open_stream(bob)
        await b.send_json_to({"type": "resume", "cursors": {str(one.id): {"seq": 0}, str(two.id): {"seq": 0}}})
        error = await receive(b)
        assert (error["type"], error["code"]) == ("error", "bad_request") and "at most 1" in error["detail"]
        assert await quiet(b)
        await b.disconnect()

    async def test_past_max_replay_or_from_the_future_is_not_recovered(self, team, settings):
        alice, bob, _, one, two = team
        settings.CHAT_MAX_REPLAY = 2
        for text in ("a", "b", "c"):
            await send_over_rest_path(alice, one, text)
        b, _ = await open_stream(bob)
        await b.send_json_to({"type": "resume", "cursors": {str(one.id): {"seq": 0}, str(two.id): {"seq": 7}}})
        assert await receive(b) == {
            "type": "resumed",
            "conversations": {str(one.id): {"recovered": False}, str(two.id): {"recovered": False}},
        }
        await send_over_rest_path(alice, one, "live")
        assert (await receive(b))["message"]["seq"] == 4
        await b.disconnect()

    async def test_a_connection_replays_a_bounded_total_over_all_its_resume_frames(self, team, settings, monkeypatch):
        from chat import consumers

        alice, bob, _, one, two = team
        settings.CHAT_MAX_REPLAY = 3
        monkeypatch.setattr(consumers, "RESUME_BUDGET", 1)  # 3 in all
        for conversation in (one, two):
            for text in ("a", "b"):
                await send_over_rest_path(alice, conversation, text)
        b, _ = await open_stream(bob)
        await b.send_json_to({"type": "resume", "cursors": {str(one.id): {"seq": 0}, str(two.id): {"seq": 0}}})
        frames = [await receive(b) for _ in range(3)]
        assert [f["type"] for f in frames] == ["message.new", "message.new", "resumed"]
        assert frames[-1]["conversations"] == {str(one.id): {"recovered": True}, str(two.id): {"recovered": False}}
        # The same frame again replays nothing more: the connection's budget is spent (one left).
        await b.send_json_to({"type": "resume", "cursors": {str(one.id): {"seq": 0}}})
        assert await receive(b) == {"type": "resumed", "conversations": {str(one.id): {"recovered": False}}}
        await b.disconnect()

    async def test_a_cursor_ahead_of_the_stream_skips_what_the_client_has(self, team, monkeypatch):
        # The client saw seq 1 on an earlier connection whose publish this stream lost; it says so,
        # and the stream does not send it again.
        alice, bob, _, one, _ = team
        b, _ = await open_stream(bob)
        await send_with_its_publish_lost(monkeypatch, alice, one, "seen elsewhere")
        await b.send_json_to({"type": "resume", "cursors": {str(one.id): {"seq": 1}}})
        assert (await receive(b))["type"] == "resumed"
        await send_over_rest_path(alice, one, "next")
        assert (await receive(b))["message"]["seq"] == 2
        await asyncio.sleep(0)
        await b.disconnect()


class TestPresence:
    async def test_a_stream_is_online_in_every_conversation_it_carries_and_hears_who_else_is(self, team):
        alice, bob, carol, one, two = team
        a, _ = await open_socket(alice, one)
        await receive(a)
        stream, _ = await open_stream(bob)
        # alice (on `one`) hears bob come online; bob's stream hears that alice is online in `one`.
        assert await receive(a, skip=()) == {"type": "presence", "conversation_id": str(one.id), "user_id": str(bob.pk), "online": True}
        assert await receive(stream, skip=()) == {
            "type": "presence", "conversation_id": str(one.id), "user_id": str(alice.pk), "online": True
        }
        # A conversation joined live is announced too.
        group = await create_group(carol, bob, title="three")
        c, _ = await open_socket(carol, group)
        await receive(c)
        joined = await receive(stream)
        assert joined["type"] == "conversation.joined"
        assert await receive(c, skip=()) == {"type": "presence", "conversation_id": str(group.id), "user_id": str(bob.pk), "online": True}
        # Leaving a conversation takes the user offline there, the stream stays (and online elsewhere).
        # (carol may have heard bob come online twice: from the list read at her join and from his
        # announcement, when the two crossed.)
        await remove(carol, group, bob)
        while (frame := await receive(c, skip=()))["online"]:
            assert frame["user_id"] == str(bob.pk)
        assert frame == {"type": "presence", "conversation_id": str(group.id), "user_id": str(bob.pk), "online": False}
        assert await a.receive_nothing(0.2)
        # The stream's disconnect takes bob offline where he still was.
        await stream.disconnect()
        assert await receive(a, skip=()) == {"type": "presence", "conversation_id": str(one.id), "user_id": str(bob.pk), "online": False}
        for socket in (a, c):
            await socket.disconnect()
