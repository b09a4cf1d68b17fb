import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol as P
from protocol.messages import MAX_IMAGES


def samples() -> list[P.Message]:
    turns = [
        P.ChatTurn(role="system", parts=[P.ContentPart(kind="text", text="be brief")]),
        P.ChatTurn(
            role="user",
            parts=[
                P.ContentPart(kind="image", image=0),
                P.ContentPart(kind="text", text="what is this? ünïcode"),
                P.ContentPart(kind="image", image=1),
            ],
        ),
    ]
    return [
        P.EncodeRequest(rid="r-1", turns=turns, images=[b"\x89PNG...", b"\xff\xd8jpeg"]),
        P.Abort(rid="r-1", reason="client went away"),
        P.AllocRequest(
            rid="r-1",
            encoder_id="enc-0",
            n_tokens=2,
            hidden=64,
            dtype="bfloat16",
            input_ids=P.int32s([1, 5, 5, 7]),
            positions=P.int32s([[0, 1, 1, 3], [0, 1, 2, 3], [0, 1, 1, 3]]),
        ),
        P.AllocGrant(
            rid="r-1",
            generation=(1 << 62) + 3,
            session="10.0.0.2:15123",
            block_tokens=16,
            n_tokens=40,
            hidden=2048,
            dtype="bfloat16",
            blocks=[7, 3, 11],
            embed_addrs=[140_000_000_000_000, 140_000_000_100_000, 140_000_000_200_000],
            deepstack_addrs=[150_000_000_000_000, 150_000_000_300_000, 150_000_000_600_000],
        ),
        P.AllocDenied(rid="r-1", code="pool_full", reason="pool is full", retry_after_s=0.5),
        P.TransferDone(rid="r-1", generation=9, n_tokens=40, checksum=0x5EADBEEF12345678),
        P.EncodeFailed(rid="r-1", generation=9, stage="vision", reason="CUDA OOM"),
        P.EncoderHello(encoder_id="enc-0", transport="mooncake", session="10.0.0.3:15555"),
        P.Heartbeat(encoder_id="enc-0", inflight=3, sent_at=1234.5),
    ]


def test_every_message_type_has_a_sample():
    assert {type(m) for m in samples()} == set(P.ALL_MESSAGES)


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = P.encode(msg)
    assert P.decode(data) == msg
    assert P.decode_as(data, type(msg)) == msg


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_plain_msgpack_reads_our_bytes(msg):
    plain = msgpack.unpackb(P.encode(msg), raw=False)
    assert plain["version"] == P.PROTOCOL_VERSION
    assert isinstance(plain["type"], str)
    # and bytes written by plain msgpack decode back into the struct
    assert P.decode(msgpack.packb(plain, use_bin_type=True)) == msg


def _tamper(msg: P.Message, **changes) -> bytes:
    plain = msgpack.unpackb(P.encode(msg), raw=False)
    plain.update(changes)
    return msgpack.packb(plain, use_bin_type=True)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"version": 1}, "unsupported protocol version 1"),  # the list-encoded prompts
        ({"type": "nope"}, "Invalid value 'nope'"),
        ({"extra": 1}, "unknown field"),
        ({"n_tokens": 49}, "need 4"),
        ({"blocks": [7, 7, 11]}, "duplicate block ids"),
        ({"embed_addrs": [1, 2]}, "one address per block"),
        ({"hidden": 0}, ">= 1"),
        ({"generation": -1}, ">= 0"),
        ({"rid": "../../etc/passwd"}, "rid"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_invalid_grant_rejected_with_reason(changes, reason):
    grant = next(m for m in samples() if isinstance(m, P.AllocGrant))
    with pytest.raises(P.ProtocolError, match=reason):
        P.decode(_tamper(grant, **changes))


def test_alloc_request_cross_field_checks():
    req = next(m for m in samples() if isinstance(m, P.AllocRequest))
    with pytest.raises(P.ProtocolError, match=r"positions must be \[3\]"):
        P.decode(_tamper(req, positions=P.int32s([[0], [0], [0]])))
    with pytest.raises(P.ProtocolError, match="more visual tokens"):
        P.decode(_tamper(req, n_tokens=5))
    with pytest.raises(P.ProtocolError, match=r"positions must be \[3\]"):
        P.decode(_tamper(req, positions=P.int32s([[0, 1, 2, 3]] * 4)))
    with pytest.raises(P.ProtocolError, match="whole number of int32"):
        P.decode(_tamper(req, input_ids=b"\x01\x00\x00"))
    with pytest.raises(P.ProtocolError, match="negative token id"):
        P.decode(_tamper(req, input_ids=P.int32s([1, 5, 5, 7])[:-4] + b"\xff\xff\xff\xff"))
    with pytest.raises(P.ProtocolError, match="negative position"):
        P.decode(_tamper(req, positions=b"\xff\xff\xff\xff" + req.positions[4:]))
    with pytest.raises(P.ProtocolError, match="Expected `bytes`"):
        P.decode(_tamper(req, input_ids=[1, 5, 5, 7]))  # the old list form is refused
    assert req.token_ids().tolist() == [1, 5, 5, 7] and req.position_ids().shape == (3, 4)


def test_int32s_refuses_values_outside_int32():
    with pytest.raises(ValueError):
        P.int32s([1 << 31])
    with pytest.raises(ValueError):
        P.int32s([-1])


def test_encode_request_image_references_checked():
    enc = next(m for m in samples() if isinstance(m, P.EncodeRequest))
    with pytest.raises(P.ProtocolError, match="each image once"):
        P.decode(_tamper(enc, images=[b"only one"]))
    with pytest.raises(P.ProtocolError, match="length"):
        P.decode(_tamper(enc, images=[b"x"] * (MAX_IMAGES + 1)))


def test_oversized_and_wrong_kind():
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.decode(b"\x00" * 100, max_bytes=10)
    with pytest.raises(P.ProtocolError, match="unexpected message Abort"):
        P.decode_as(P.encode(P.Abort(rid="x")), P.AllocGrant)
    with pytest.raises(TypeError):
        P.encode({"type": "abort"})  # type: ignore[arg-type]


def test_construction_validates_too():
    with pytest.raises(ValueError, match="need 1"):
        P.AllocGrant(
            rid="r", generation=0, session="s", block_tokens=4, n_tokens=3, hidden=8,
            dtype="float32", blocks=[], embed_addrs=[], deepstack_addrs=[],
        )  # fmt: skip


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        msg = P.decode(data)
    except P.ProtocolError:
        return
    assert isinstance(msg, P.Message)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_protocol_error(data):
    _decode_or_protocol_error(data)


@FUZZ
@given(
    st.sampled_from(range(len(samples()))),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 64),
)
def test_mutated_messages_only_raise_protocol_error(which, flips, cut):
    data = bytearray(P.encode(samples()[which]))
    for pos, val in flips:
        data[pos % len(data)] = val
    _decode_or_protocol_error(bytes(data[: max(1, len(data) - cut)]))


_plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


@FUZZ
@given(st.sampled_from([m.__struct_config__.tag for m in P.ALL_MESSAGES]), _plain)
def test_well_formed_msgpack_with_wrong_shapes_is_rejected_cleanly(tag, junk):
    payload = {"type": tag, "version": 1, "rid": junk, "blocks": junk, "turns": junk}
    try:
        data = msgpack.packb(payload, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    _decode_or_protocol_error(data)


def test_deeply_nested_input_is_rejected():
    data = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(P.ProtocolError):
        P.decode(data)
