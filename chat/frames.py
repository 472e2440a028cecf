"""Outbound WebSocket frames as text: one encoder, and the frames every local socket of a
conversation shares, encoded once per process.

The fan-out (chat.fanout) hands one event, and one message dict, to every local socket of its
conversation: a frame built from it is the same for all of them, so it is encoded once and the same
text is written to each (identity, not equality, is checked: a patched copy, an edit or a tombstone
is a new dict).
"""
from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from collections.abc import Callable

import orjson
from django.conf import settings

from chat.store import utf8_length


def encode_frame(frame: dict) -> str:
    """A frame as JSON text that always has a UTF-8 encoding, whatever client input it echoes."""
    try:
        return orjson.dumps(frame).decode()
    except TypeError:
        # orjson refuses integers beyond 64 bits (client metadata) and unpaired surrogates (a
        # client's "\\ud800" escape, echoed in client_message_id): the standard encoder takes both,
        # and with ensure_ascii it writes a surrogate as its escape, so daphne can encode the text.
        return json.dumps(frame, separators=(",", ":"), ensure_ascii=True)


_FRAMES_KEPT = 256
_frames: OrderedDict[int, tuple[dict, str]] = OrderedDict()


def shared_frame(source: dict, build: Callable[[dict], dict]) -> str:
    """The encoded frame `build(source)`, encoded once for every socket that is handed `source`."""
    kept = _frames.get(id(source))
    if kept is not None and kept[0] is source:
        return kept[1]
    text = encode_frame(build(source))
    _frames[id(source)] = (source, text)
    if len(_frames) > _FRAMES_KEPT:
        _frames.popitem(last=False)
    return text


def message_new_frame(message: dict) -> str:
    return shared_frame(
        message, lambda m: {"type": "message.new", "conversation_id": m["conversation_id"], "message": m}
    )


def member_frame(event: dict, conversation_id: uuid.UUID | str) -> dict:
    """The frame of a typing, presence or read event: the same for every socket of the conversation."""
    frame = {"type": event["type"], "conversation_id": str(conversation_id), "user_id": event["user_id"]}
    if event["type"] == "presence":
        frame["online"] = event["online"]
    elif event["type"] == "read":
        frame["seq"] = event["seq"]
    return frame


def frame_too_large(text: str) -> bool:
    """Whether a text frame's UTF-8 encoding is over the transport's cap (CHAT_MAX_FRAME_BYTES)."""
    cap = settings.CHAT_MAX_FRAME_BYTES
    return len(text) > cap or (len(text) * 4 > cap and utf8_length(text) > cap)
