"""Control plane: typed, versioned messages and their MessagePack codec (no torch, no sockets)."""

from protocol.codec import MAX_MESSAGE_BYTES, ProtocolError, decode, decode_as, encode
from protocol.messages import (
    ALL_MESSAGES,
    PROTOCOL_VERSION,
    Abort,
    ChatTurn,
    ContentPart,
    EncodeFailed,
    EncodeJob,
    EncoderHello,
    EncodeTimings,
    Heartbeat,
    Message,
    TransferDone,
)

__all__ = [
    "ALL_MESSAGES",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "Abort",
    "ChatTurn",
    "ContentPart",
    "EncodeFailed",
    "EncodeJob",
    "EncodeTimings",
    "EncoderHello",
    "Heartbeat",
    "Message",
    "ProtocolError",
    "TransferDone",
    "decode",
    "decode_as",
    "encode",
]
