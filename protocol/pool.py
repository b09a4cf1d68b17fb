"""Messages between the language server's front door and the receive pool's host process.

With ``--engine sglang`` the receive pool (``MultimodalDataBuffers``) lives in SGLang's
scheduler process, where the model runs (TP rank 0); the front door keeps the lending logic
(``language_server.receiver.Receiver``) on a memory-less ``PoolLayout``. They talk over one
ZeroMQ PAIR socket on an ``ipc://`` path in a private (0700) directory::

    host -> front door   PoolHello (once, at model load), RowsVerdict, PoolStats
    front door -> host   VerifyRows, PoolStatsQuery

Same codec conventions as ``protocol.messages`` (a ``type`` tag and a ``version``), decoded by
``decode_pool`` into exactly these types.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from protocol.codec import decode_with
from protocol.messages import MAX_BLOCKS, U32, U64, DType, Hidden, Message, Name, Reason, Tokens

Blocks = Annotated[list[U32], msgspec.Meta(max_length=MAX_BLOCKS)]
MAX_POOL_MESSAGE_BYTES = 16 << 20


class PoolHello(Message, frozen=True, kw_only=True, tag="pool_hello"):
    """The pool exists and is registered with the transport: where encoders write into it."""

    session: Name
    embed_base: U64
    deepstack_base: U64
    num_blocks: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCKS)]
    block_tokens: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]
    hidden: Hidden
    dtype: DType
    device: Name
    pid: U32


class VerifyRows(Message, frozen=True, kw_only=True, tag="verify_rows"):
    """Check the rows of one image (its blocks, in lending order) against the writer's checksum."""

    id: U64
    blocks: Blocks
    n_tokens: Tokens
    checksum: U64


class RowsVerdict(Message, frozen=True, kw_only=True, tag="rows_verdict"):
    """The answer to ``VerifyRows`` ``id``: ``problem`` is empty when the rows match."""

    id: U64
    problem: Reason = ""


class PoolStatsQuery(Message, frozen=True, kw_only=True, tag="pool_stats_query"):
    id: U64


class PoolStats(Message, frozen=True, kw_only=True, tag="pool_stats"):
    """Counters of the pool's host: visual rows copied out of the pool into the model's inputs
    (``rows_copied``; each row once per prefill), ``copy_calls``, images verified; decode
    forwards and the sequences they carried (``decode_rows / decode_steps`` is the mean decode
    batch), and the forward thread's torch intra-op threads (0: no decode yet)."""

    id: U64
    rows_copied: U64
    copy_calls: U64
    verified: U64
    pid: U32
    decode_steps: U64 = 0
    decode_rows: U64 = 0
    torch_threads: U32 = 0


ANY_POOL_MESSAGE = PoolHello | VerifyRows | RowsVerdict | PoolStatsQuery | PoolStats
_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder = msgspec.msgpack.Decoder(ANY_POOL_MESSAGE)


def encode_pool(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode_pool(data: bytes | bytearray | memoryview) -> Message:
    """Decode one pool-channel message; raises only ``ProtocolError``."""
    return decode_with(_decoder, data, MAX_POOL_MESSAGE_BYTES)
