"""MessagePack codec for the control plane.

``encode`` turns a message struct into bytes; ``decode`` turns untrusted bytes into a validated
message struct or raises ``ProtocolError`` with a reason, and nothing else. The wire format is a
plain MessagePack map ``{"type": <tag>, "version": <int>, <field>: <value>, ...}`` that any
MessagePack library can read.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from protocol.messages import ANY_MESSAGE, Message

MAX_MESSAGE_BYTES = 256 << 20

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder = msgspec.msgpack.Decoder(ANY_MESSAGE)

M = TypeVar("M", bound=Message)


class ProtocolError(ValueError):
    """A control-plane message could not be decoded or failed validation."""


def encode(msg: Message) -> bytes:
    """Serialize one message (caller owns the returned bytes)."""
    if not isinstance(msg, Message):
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    return _encoder.encode(msg)


def decode(data: bytes | bytearray | memoryview, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode and validate untrusted bytes. Raises only ``ProtocolError``."""
    return decode_with(_decoder, data, max_bytes)


def decode_with(
    decoder: msgspec.msgpack.Decoder, data: bytes | bytearray | memoryview, max_bytes: int
) -> Message:
    """``decoder.decode(data)`` for untrusted bytes of at most ``max_bytes``; raises only
    ``ProtocolError`` (also for channels with their own message set, e.g. ``protocol.pool``)."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return decoder.decode(data)
    except (msgspec.MsgspecError, ValueError, TypeError, RecursionError, MemoryError) as exc:
        raise ProtocolError(str(exc) or type(exc).__name__) from None


def decode_as(data: bytes | bytearray | memoryview, *types: type[M]) -> M:
    """Decode and also require the message to be one of ``types``."""
    msg = decode(data)
    if not isinstance(msg, types):
        names = ", ".join(t.__name__ for t in types)
        raise ProtocolError(f"unexpected message {type(msg).__name__}; expected {names}")
    return msg
