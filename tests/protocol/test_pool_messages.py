"""The pool channel's messages: round trips, and untrusted bytes give only ProtocolError."""

from __future__ import annotations

import msgspec
import pytest

import protocol as P
from protocol.pool import (
    PoolHello,
    PoolStats,
    PoolStatsQuery,
    RowsVerdict,
    VerifyRows,
    decode_pool,
    encode_pool,
)

MESSAGES = [
    PoolHello(
        session="127.0.0.1:15000",
        embed_base=1 << 40,
        deepstack_base=(1 << 40) + 4096,
        num_blocks=256,
        block_tokens=64,
        hidden=4096,
        dtype="bfloat16",
        device="cuda:0",
        pid=4242,
    ),  # fmt: skip
    VerifyRows(id=7, blocks=[3, 1, 2], n_tokens=150, checksum=(1 << 63) - 1),
    RowsVerdict(id=7, problem="do not match the sender's checksum"),
    RowsVerdict(id=8),
    PoolStatsQuery(id=9),
    PoolStats(
        id=9,
        rows_copied=1234,
        copy_calls=20,
        verified=5,
        pid=4242,
        decode_steps=31,
        decode_rows=124,
        torch_threads=1,
    ),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert decode_pool(encode_pool(msg)) == msg


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgspec.msgpack.encode(
            {"type": "verify_rows", "id": -1, "blocks": [], "n_tokens": 0, "checksum": 0}
        ),  # fmt: skip
        msgspec.msgpack.encode({"type": "pool_hello", "session": "x"}),  # missing fields
        msgspec.msgpack.encode({"type": "encode_job"}),  # the encoders' messages are not here
        P.encode(P.Heartbeat(encoder_id="e")),
        b"\x91" * 100_000,  # deep nesting
        b"\x00" * (17 << 20),  # too large
    ],
)
def test_untrusted_bytes_give_protocol_error(data):
    with pytest.raises(P.ProtocolError):
        decode_pool(data)
