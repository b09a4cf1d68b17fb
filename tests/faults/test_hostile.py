"""Hostile input on live sockets (property-based), HTTP limits, and CURVE authentication."""

from __future__ import annotations

import time

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol as P
from epd.cluster import LocalCluster, script
from tests.faults.conftest import image_body
from tests.protocol.test_codec import samples

pytestmark = pytest.mark.slow
LIVE = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


def _wrong_version(msg: P.Message) -> bytes:
    import msgpack

    plain = msgpack.unpackb(P.encode(msg))
    plain["version"] = 99
    return msgpack.packb(plain)


def _mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, val in flips:
        out[pos % len(out)] = val
    return bytes(out)


frames = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda i, f: _mutate(P.encode(samples()[i]), f), st.integers(0, len(samples()) - 1),
              st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=6)),
    st.builds(lambda i: _wrong_version(samples()[i]), st.integers(0, len(samples()) - 1)),
    st.sampled_from([P.encode(m) for m in samples()]),  # valid messages for unknown requests
)  # fmt: skip


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("hostile")
    with LocalCluster(tiny_model_dir, n_encoders=1, log_dir=logs,
                      language_args=["--max-prompt-tokens", "64"]) as c:  # fmt: skip
        yield c, logs


@pytest.fixture(scope="module")
def attacker(live):
    cluster, _ = live
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{cluster.encoder_ports[0]}")
    yield sock
    sock.close(linger=2000)  # deliver what is still queued


@LIVE
@given(payload=st.lists(frames, min_size=1, max_size=3))
def test_encoder_socket_survives_fuzzing(attacker, payload):
    attacker.send_multipart(payload)


def test_encoder_still_serves_after_fuzzing_and_logged_why(live, make_image):
    cluster, logs = live
    status, _ = cluster.chat(image_body(make_image))
    assert status == 200
    assert cluster.procs["encoder-0"].poll() is None
    log = (logs / "encoder-0.log").read_text()
    assert "rejected a message" in log and "unsupported protocol version" in log


def test_language_survives_a_hostile_encoder(scripted, language_for):
    lang = language_for([scripted.address])
    lang.wait_up()
    junk = [b"", b"\xc1", b"\x91" * 10_000 + b"\xc0", _wrong_version(samples()[3]),
            *[P.encode(m) for m in samples()], _mutate(P.encode(samples()[2]), [(9, 0x20)])]  # fmt: skip
    for data in junk * 5:
        scripted.send(data)
    time.sleep(0.5)
    health = lang.health()
    link = health["encoders"][0]
    assert link["state"] == "up" and link["rejected_messages"] >= 5
    assert health["requests"]["dropped_messages"] >= 5  # valid messages, unknown requests
    status, body = lang.chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def test_http_rejects_bad_image_and_overlong_prompts(live, make_image):
    cluster, _ = live
    status, body = cluster.chat({"messages": [{"role": "user", "content": "x" * 500}]})
    assert status == 400 and "limit is 64" in body["error"]["message"]
    status, body = cluster.chat(image_body(make_image, 224, 224))  # 49 image tokens + text > 64
    assert status == 400 and "limit is 64" in body["error"]["message"]
    bad = image_body(make_image)
    bad["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,iVBORw0KGgo="
    status, body = cluster.chat(bad)
    assert status == 400 and "decode" in body["error"]["message"]
    pool = cluster.health()["pool"]
    assert pool["available_blocks"] == pool["total_blocks"]


def test_curve_admits_only_authorized_peers(tiny_model_dir, make_image, tmp_path):
    import subprocess

    keys, clients = tmp_path / "keys", tmp_path / "clients"
    subprocess.run(script("epd-keys") + [str(keys)], check=True, capture_output=True)
    subprocess.run(script("epd-keys") + [str(tmp_path / "intruder"), "--name", "intruder"],
                   check=True, capture_output=True)  # fmt: skip
    clients.mkdir()
    (clients / "language.key").write_bytes((keys / "language.key").read_bytes())
    enc = ["--curve-keys", str(keys / "encoder.key_secret"), "--curve-clients", str(clients)]
    lang = ["--curve-keys", str(keys / "language.key_secret"),
            "--curve-server-key", str(keys / "encoder.key")]  # fmt: skip
    with LocalCluster(tiny_model_dir, log_dir=tmp_path / "logs", encoder_args=enc,
                      language_args=lang) as c:  # fmt: skip
        status, _ = c.chat(image_body(make_image))
        assert status == 200
        address = f"tcp://127.0.0.1:{c.encoder_ports[0]}"
        request = P.encode(samples()[0])
        import zmq.auth

        for who in ("plain", "intruder"):
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if who == "intruder":
                pub, sec = zmq.auth.load_certificate(
                    str(tmp_path / "intruder" / "intruder.key_secret")
                )
                sock.curve_publickey, sock.curve_secretkey = pub, sec
                sock.curve_serverkey = zmq.auth.load_certificate(str(keys / "encoder.key"))[0]
            sock.connect(address)
            sock.send(request)
            sock.send(P.encode(P.Heartbeat(encoder_id="x", inflight=0, sent_at=0.0)))
            assert sock.poll(1500) == 0, f"{who} peer got an answer"
            sock.close(linger=0)
        c.stop()
        log = (tmp_path / "logs" / "encoder-0.log").read_text()
    assert "CURVE on" in log
    assert "'jobs': 1," in log  # only the authorized language server's job got in
