import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol as P
from protocol.messages import MAX_IMAGES, MAX_VIDEO_FRAMES


def samples() -> list[P.Message]:
    return [
        P.EncodeJob(
            rid="r-1",
            image=1,
            data=b"\x89PNG...",
            grid=[1, 14, 14],
            n_tokens=40,
            hidden=2048,
            dtype="bfloat16",
            generation=(1 << 62) + 3,
            session="10.0.0.2:15123",
            block_tokens=16,
            blocks=[7, 3, 11],
            embed_addrs=[140_000_000_000_000, 140_000_000_100_000, 140_000_000_200_000],
            deepstack_addrs=[150_000_000_000_000, 150_000_000_300_000, 150_000_000_600_000],
        ),
        P.Abort(rid="r-1", image=1, reason="client went away"),
        P.TransferDone(rid="r-1", image=1, generation=9, n_tokens=40, checksum=0x5EADBEEF12345678),
        P.EncodeFailed(rid="r-1", generation=9, stage="vision", reason="CUDA OOM ünïcode"),
        P.EncodeFailed(rid="r-1", image=2, generation=9, stage="transfer", write_stopped=False),
        P.EncoderHello(
            encoder_id="enc-0", transport="mooncake", session="10.0.0.3:15555", incarnation=12345
        ),
        P.Heartbeat(encoder_id="enc-0", inflight=3, sent_at=1234.5, incarnation=12345),
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
        ({"version": 2}, "unsupported protocol version 2"),  # the AllocRequest/AllocGrant flow
        ({"type": "nope"}, "Invalid value 'nope'"),
        ({"type": "grant"}, "Invalid value 'grant'"),  # v2's messages are gone
        ({"extra": 1}, "unknown field"),
        ({"n_tokens": 49}, "need 4"),
        ({"blocks": [7, 7, 11]}, "duplicate block ids"),
        ({"embed_addrs": [1, 2]}, "one address per block"),
        ({"hidden": 0}, ">= 1"),
        ({"generation": -1}, ">= 0"),
        ({"rid": "../../etc/passwd"}, "rid"),
        ({"dtype": "int8"}, "dtype"),
        ({"image": MAX_IMAGES}, "image"),
        ({"grid": [1, 2]}, "grid"),
        ({"grid": [1, 2, 2]}, "fewer patches"),
        ({"data": b""}, "data"),
        ({"blocks": [], "embed_addrs": [], "deepstack_addrs": []}, "blocks"),
    ],
)
def test_invalid_job_rejected_with_reason(changes, reason):
    job = next(m for m in samples() if isinstance(m, P.EncodeJob))
    with pytest.raises(P.ProtocolError, match=reason):
        P.decode(_tamper(job, **changes))


def test_failed_defaults_promise_a_stopped_write():
    msg = P.decode(msgpack.packb({"type": "failed", "version": P.PROTOCOL_VERSION, "rid": "r"}))
    assert isinstance(msg, P.EncodeFailed) and msg.write_stopped is True
    with pytest.raises(P.ProtocolError, match="write_stopped"):
        P.decode(_tamper(samples()[4], write_stopped="no"))


def test_oversized_and_wrong_kind():
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.decode(b"\x00" * 100, max_bytes=10)
    with pytest.raises(P.ProtocolError, match="unexpected message Abort"):
        P.decode_as(P.encode(P.Abort(rid="x")), P.EncodeJob)
    with pytest.raises(TypeError):
        P.encode({"type": "abort"})  # type: ignore[arg-type]


def test_construction_validates_too():
    with pytest.raises(ValueError, match="need 1"):
        P.EncodeJob(
            rid="r", data=b"x", grid=[1, 2, 2], generation=0, session="s", block_tokens=4,
            n_tokens=3, hidden=8, dtype="float32", blocks=[1, 2], embed_addrs=[1, 2],
            deepstack_addrs=[3, 4],
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
    payload = {
        "type": tag,
        "version": P.PROTOCOL_VERSION,
        "rid": junk,
        "blocks": junk,
        "grid": junk,
        "data": junk,
    }
    try:
        data = msgpack.packb(payload, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    _decode_or_protocol_error(data)


def test_deeply_nested_input_is_rejected():
    data = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(P.ProtocolError):
        P.decode(data)


# --- video jobs -------------------------------------------------------------------------------


def _video_job(**changes) -> P.EncodeJob:
    image = next(m for m in samples() if isinstance(m, P.EncodeJob))
    fields = {f: getattr(image, f) for f in image.__struct_fields__}
    return P.EncodeJob(**{**fields, "grid": [2, 14, 14], "frames": [0, 3, 9], **changes})


def test_video_jobs_round_trip():
    container = _video_job(data=b"\x00\x00\x00\x18ftypmp42")
    sampled = _video_job(data=b"", frames=[], frame_data=[b"\x89PNG-a", b"\x89PNG-b"])
    for job in (container, sampled):
        assert job.is_video
        assert P.decode(P.encode(job)) == job
        assert P.decode_as(P.encode(job), P.EncodeJob).frame_data == job.frame_data
    assert P.decode(P.encode(container)).frames == [0, 3, 9]
    image = next(m for m in samples() if isinstance(m, P.EncodeJob))
    assert image.frames == [] and image.frame_data == [] and not image.is_video
    assert not P.decode(P.encode(image)).is_video


def test_encode_timings_carry_the_decode_time():
    done = P.TransferDone(rid="r", generation=1, n_tokens=4, checksum=5,
                          timings=P.EncodeTimings(preprocess_s=0.5, decode_s=0.25))  # fmt: skip
    assert P.decode(P.encode(done)).timings.decode_s == 0.25
    with pytest.raises(P.ProtocolError, match="decode_s"):
        P.decode(_tamper(done, timings={"decode_s": -1.0}))


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"frame_data": [b"frame"]}, "exactly one of data and frame_data"),  # data is set too
        ({"data": b"", "frames": []}, "exactly one of data and frame_data"),
        ({"frames": [3, 1]}, "frame indices must increase"),
        ({"frames": [0, 3, 3]}, "frame indices must increase"),
        ({"data": b"", "frame_data": [b"a", b"b"]}, "frames index a container"),
        ({"data": b"", "frames": [], "frame_data": [b"a", b""]}, "frame_data"),  # an empty frame
        ({"frames": [-1, 2]}, "frames"),
        ({"frames": list(range(MAX_VIDEO_FRAMES + 1))}, "frames"),
    ],
)
def test_invalid_video_job_rejected_with_reason(changes, reason):
    job = _video_job(data=b"\x00\x00\x00\x18ftypmp42")
    with pytest.raises(P.ProtocolError, match=reason):
        P.decode(_tamper(job, **changes))
