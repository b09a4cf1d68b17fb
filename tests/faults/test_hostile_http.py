"""Hostile HTTP clients against a live cluster (two encoders, Mooncake over TCP): every malformed
or unsupported field is a JSON 400 naming it, an unknown model a 404, an oversized body a 413
before it is buffered, local paths are confined with one answer for every refused path, a client
that goes away cancels its generation (499), stop strings never leak, /health stays fast while a
prompt is prepared, and a property-based fuzz never gets a 500 or a stuck request. After each
case the server still serves an image request and every block is free."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import gc
import json
import re
import socket
import time
import urllib.request
from types import SimpleNamespace

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from epd.cluster import LocalCluster, get_json
from tests.faults.conftest import image_body

pytestmark = pytest.mark.slow
BODY_LIMIT = 16 << 20
IMAGE_LIMIT = 2 << 20
NAMES = ("tiny-vl", "tiny")
REFUSED = "image path refused. This server reads local media only when started with"


class Live(SimpleNamespace):
    def __repr__(self) -> str:  # hypothesis prints its arguments: not the data URL
        return f"Live({self.cluster.url})"


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory, make_image):
    """The cluster, its media directory (one image, a link out, a too-big file, secrets
    beside it), and a good image data URL."""
    root = tmp_path_factory.mktemp("hostile-http")
    media = root / "media"
    media.mkdir()
    make_image(64, 64, 3).save(media / "cat.png")
    (media / "big.png").write_bytes(b"\x89PNG" + b"\x00" * IMAGE_LIMIT)
    (root / "secret.png").write_bytes((media / "cat.png").read_bytes())
    (media / "link-out.png").symlink_to(root / "secret.png")
    args = ["--served-model-name", *NAMES, "--allowed-local-media-path", str(media),
            "--max-body-bytes", str(BODY_LIMIT), "--max-image-bytes", str(IMAGE_LIMIT)]  # fmt: skip
    with LocalCluster(tiny_model_dir, n_encoders=2, log_dir=root / "logs", language_args=args) as c:
        good = image_body(make_image)["messages"][0]["content"][0]["image_url"]["url"]
        yield Live(cluster=c, media=media, root=root, good_url=good,
                              image_body=image_body(make_image))  # fmt: skip


def _post(url: str, data: bytes, timeout: float = 30.0) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/chat/completions", data=data,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _chat(live, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()  # "\ud800" escaped
    return _post(live.cluster.url, data)


def _still_serving(live) -> None:
    """The next normal image request is a 200, and every block is back in the pool."""
    status, reply = _chat(live, live.image_body)
    assert status == 200, reply
    deadline = time.monotonic() + 10
    while True:
        health = live.cluster.health()
        pool = health["pool"]
        if pool["available_blocks"] == pool["total_blocks"] and pool["pending_requests"] == 0:
            break
        assert time.monotonic() < deadline, pool
        time.sleep(0.05)
    assert {e["state"] for e in health["encoders"]} == {"up"}


def _text(text="hi", **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 2, **extra}


def _image(live, ref, kind="image_url", text="what is it?", **extra) -> dict:
    part = {"type": kind, kind: {"url": ref} if kind == "image_url" else ref}
    content = [part, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


# name -> (body (from live), status, text the error message must hold)
CASES = {
    "lone surrogate next to an image": (
        lambda x: _image(x, x.good_url, text="look \ud800 here"), 400,
        "messages[0].content[1].text is not valid Unicode"),
    "lone surrogate as content": (lambda x: _text("\udfff"), 400, "messages[0].content is not"),
    "stop 5": (lambda x: _text(stop=5), 400, "stop must be a string or a list"),
    "stop list of numbers": (lambda x: _text(stop=["a", 3]), 400, "stop must be"),
    "stop surrogate": (lambda x: _text(stop="\ud800"), 400, "stop[0] is not valid Unicode"),
    "seed 2**70": (lambda x: _text(seed=2**70), 400, "seed must be an integer in"),
    "seed string": (lambda x: _text(seed="7"), 400, "seed must be an integer"),
    "base64 without data prefix": (
        lambda x: _image(x, x.good_url.split(",", 1)[1], kind="image"), 400,
        "messages[0].content[0].image: " + REFUSED),
    "non-dict message": (lambda x: {"messages": ["hi"]}, 400, "messages[0] must be an object"),
    "messages a string": (lambda x: {"messages": "nope"}, 400, "messages must be a non-empty"),
    "no messages": (lambda x: {"model": "tiny"}, 400, "messages must be a non-empty"),
    "role a list": (lambda x: {"messages": [{"role": ["user"], "content": "x"}]}, 400,
                    "messages[0].role must be one of"),
    "nested content": (lambda x: _image(x, {"url": {"url": x.good_url}}), 400,
                       "messages[0].content[0].image_url must carry a URL string"),
    "temperature negative": (lambda x: _text(temperature=-1), 400, "temperature must be a number"),
    "temperature string": (lambda x: _text(temperature="hot"), 400, "temperature must be"),
    "temperature huge": (lambda x: _text(temperature=10**400), 400, "temperature must be"),
    "temperature NaN": (lambda x: json.dumps(_text(temperature=float("nan"))).encode(), 400,
                        "temperature must be"),
    "top_p zero": (lambda x: _text(top_p=0), 400, "top_p must be a number in (0, 1]"),
    "top_p above one": (lambda x: _text(top_p=1.5), 400, "top_p must be"),
    "top_k negative": (lambda x: _text(top_k=-2), 400, "top_k must be an integer"),
    "top_k fraction": (lambda x: _text(top_k=1.5), 400, "top_k must be an integer"),
    "max_tokens bool": (lambda x: _text(max_tokens=True), 400, "max_tokens must be an integer"),
    "max_tokens zero": (lambda x: _text(max_tokens=0), 400, "max_tokens must be an integer"),
    "max_tokens huge": (lambda x: _text(max_tokens=2**64), 400, "max_tokens must be an integer"),
    "max_completion_tokens str": (lambda x: _text(max_completion_tokens="4"), 400,
                                  "max_completion_tokens must be an integer"),
    "stream string": (lambda x: _text(stream="yes"), 400, "stream must be a boolean"),
    "stream_options list": (lambda x: _text(stream_options=[1]), 400, "stream_options must be"),
    "include_usage string": (lambda x: _text(stream=True, stream_options={"include_usage": 1}),
                             400, "stream_options.include_usage must be a boolean"),
    "ignore_eos string": (lambda x: _text(ignore_eos="true"), 400, "ignore_eos must be"),
    "model a number": (lambda x: _text(model=5), 400, "model must be a string"),
    "logprobs": (lambda x: _text(logprobs=True), 400, "logprobs is not supported"),
    "top_logprobs": (lambda x: _text(top_logprobs=3), 400, "top_logprobs is not supported"),
    "tools": (lambda x: _text(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
              "tools is not supported"),
    "tool_choice": (lambda x: _text(tool_choice="required"), 400, "tool_choice is not supported"),
    "functions": (lambda x: _text(functions=[{"name": "f"}]), 400, "functions is not supported"),
    "response_format": (lambda x: _text(response_format={"type": "json_object"}), 400,
                        "response_format is not supported"),
    "n 2": (lambda x: _text(n=2), 400, "n: only n=1 is supported"),
    "logit_bias": (lambda x: _text(logit_bias={"1": 5}), 400, "logit_bias is not supported"),
    "presence_penalty": (lambda x: _text(presence_penalty=0.5), 400,
                         "presence_penalty is not supported"),
    "frequency_penalty": (lambda x: _text(frequency_penalty=-1), 400,
                          "frequency_penalty is not supported"),
    "body not an object": (lambda x: [1, 2], 400, "the request body must be a JSON object"),
    "invalid JSON": (lambda x: b'{"messages": [', 400, ""),
    "invalid UTF-8": (lambda x: b'{"messages": "\xff\xfe"}', 400, ""),
    "deep nesting": (lambda x: b"[" * 100_000 + b"]" * 100_000, 400, "nests too deeply"),
    "huge integer literal": (lambda x: b'{"seed": ' + b"9" * 5000 + b"}", 400, ""),
    "remote URL": (lambda x: _image(x, "http://169.254.169.254/latest"), 400, "scheme 'http'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_field_is_a_json_400_naming_it(live, case):
    make, status, message = CASES[case]
    code, reply = _chat(live, make(live))
    assert code == status, reply
    assert set(reply) == {"error"} and reply["error"]["code"] == status
    assert reply["error"]["type"] == "invalid_request_error"
    assert message in reply["error"]["message"], reply
    _still_serving(live)


# Every refused path: outside the directory, missing, a directory, a link out, too big, a
# secret file, a 300-character name, a base64 string that is no path, "..", a file URL.
REFUSED_PATHS = {
    "/etc/shadow": lambda x: "/etc/shadow",
    "/proc/self/environ": lambda x: "/proc/self/environ",
    "outside": lambda x: str(x.root / "secret.png"),
    "dot-dot": lambda x: str(x.media / ".." / "secret.png"),
    "link out": lambda x: str(x.media / "link-out.png"),
    "missing": lambda x: str(x.media / "missing.png"),
    "a directory": lambda x: str(x.media),
    "too big": lambda x: str(x.media / "big.png"),
    "300 characters": lambda x: str(x.media / ("a" * 300 + ".png")),
    "file URL outside": lambda x: f"file://{x.root}/secret.png",
    "NUL byte": lambda x: str(x.media / "cat.png\x00"),
}


def test_every_refused_path_gets_one_message_and_a_good_one_is_read(live):
    answers = set()
    for name, path in REFUSED_PATHS.items():
        status, reply = _chat(live, _image(live, path(live)))
        assert status == 400, (name, reply)
        answers.add(reply["error"]["message"])
    assert len(answers) == 1, answers
    assert answers.pop().startswith("messages[0].content[0].image_url: " + REFUSED)
    for ok in (str(live.media / "cat.png"), "cat.png", f"file://{live.media}/cat.png"):
        status, reply = _chat(live, _image(live, ok))
        assert status == 200, (ok, reply)
        assert reply["epd"]["timings"]["visual_tokens"] == 4
    _still_serving(live)


def test_unknown_model_is_a_404_like_vllm_and_aliases_match(live):
    status, reply = _chat(live, _text(model="gpt-4o"))
    assert status == 404
    assert reply == {"error": {"message": "The model `gpt-4o` does not exist.",
                               "type": "NotFoundError", "param": "model", "code": 404}}  # fmt: skip
    # decided before the prompt is prepared: an image that is no image does not matter then
    garbage = "data:image/png;base64," + base64.b64encode(b"not an image" * 100).decode()
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": garbage}}]}]}  # fmt: skip
    assert _chat(live, body)[0] == 404
    assert _chat(live, {**body, "model": NAMES[0]})[0] == 400
    for name in (*NAMES, None):
        body = _text(max_tokens=1) if name is None else _text(model=name, max_tokens=1)
        status, reply = _chat(live, body)
        assert status == 200 and reply["model"] == NAMES[0], reply
    models = get_json(live.cluster.url + "/v1/models")
    assert [m["id"] for m in models["data"]] == list(NAMES)
    _still_serving(live)


def test_neutral_values_of_unsupported_fields_are_accepted(live):
    body = _text(n=1, logprobs=False, tools=[], tool_choice="none", presence_penalty=0,
                 frequency_penalty=0.0, response_format={"type": "text"}, logit_bias={},
                 top_logprobs=None, user="someone", metadata={"a": "b"}, top_k=-1, seed=-5,
                 temperature=0.7, top_p=0.9, max_completion_tokens=2.0)  # fmt: skip
    status, reply = _chat(live, body)
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] <= 2


def test_a_tiny_temperature_samples_greedily(live):
    """Found by the fuzz test: logits / 1e-300 overflowed into NaN probabilities (a 500)."""
    body = _text("Count.", max_tokens=4, ignore_eos=True)
    replies = [_chat(live, {**body, "temperature": t}) for t in (0, 1e-300, 1e-6)]
    assert [status for status, _ in replies] == [200] * 3, replies
    assert len({tuple(reply["epd"]["token_ids"]) for _, reply in replies}) == 1


def _raw(live, head: str, chunks=(), read_timeout=10.0) -> tuple[int, dict, int]:
    """Send ``head`` then ``chunks`` until the server answers; (status, JSON body, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", live.cluster.http_port), timeout=read_timeout) as s:
        s.sendall(head.encode())
        for chunk in chunks:
            s.settimeout(0)
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break  # answered already
            except BlockingIOError:
                pass
            s.settimeout(read_timeout)
            try:
                s.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
        s.settimeout(read_timeout)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            more = s.recv(65536)
            if not more:
                break
            data += more
    head_part, body = data.split(b"\r\n\r\n", 1)
    return int(head_part.split()[1]), json.loads(body[: _length(data)]), sent


def _length(data: bytes) -> int:
    found = re.search(rb"content-length: (\d+)", data.split(b"\r\n\r\n", 1)[0], re.I)
    return int(found.group(1)) if found else 1 << 30


def test_body_limit_is_enforced_before_buffering(live):
    path = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # a declared length over the limit: 413 before a single body byte is read
    status, reply, _ = _raw(live, path + f"Content-Length: {BODY_LIMIT + 1}\r\n\r\n")
    assert status == 413 and f"larger than {BODY_LIMIT} bytes" in reply["error"]["message"]
    # no declared length (chunked): counted while reading, refused soon after the limit
    piece = b"x" * (1 << 20)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    status, reply, sent = _raw(live, path + "Transfer-Encoding: chunked\r\n\r\n", [chunk] * 64)
    assert status == 413 and reply["error"]["code"] == 413
    assert sent < BODY_LIMIT + (8 << 20), sent  # not 64 MiB: the server stopped reading
    _still_serving(live)


def test_unknown_routes_and_methods_answer_json(live):
    for method, path, code in (("GET", "/nope", 404), ("GET", "/v1/chat/completions", 405)):
        req = urllib.request.Request(live.cluster.url + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == code
        assert json.loads(info.value.read())["error"]["code"] == code


def test_a_bug_is_a_json_500(tiny_model_dir):
    """No live request can reach a bug on purpose: the catch-all handler is shown in process,
    with a service whose prepare fails the way a bug would."""
    from fastapi.testclient import TestClient

    from language_server.config import LanguageConfig
    from language_server.http.app import create_app
    from language_server.http.metrics import Metrics

    async def prepare(body: bytes):
        raise KeyError("a bug")

    service = SimpleNamespace(config=LanguageConfig(model=tiny_model_dir), prepare=prepare)
    client = TestClient(create_app(service, Metrics()), raise_server_exceptions=False)  # type: ignore[arg-type]
    r = client.post("/v1/chat/completions", content=b"{}")
    assert r.status_code == 500
    assert r.json()["error"]["message"] == "internal server error (KeyError); see the server log"


def _metric(live, status: str) -> float:
    with urllib.request.urlopen(live.cluster.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(rf'epd_requests_total{{status="{status}"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def _idle(live, timeout: float) -> float:
    """Seconds until the engine runs nothing and no request is in flight (fails past timeout)."""
    t0 = time.monotonic()
    while True:
        health = live.cluster.health()
        if health["engine"]["active"] == 0 and health["requests"]["inflight"] == 0:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, health
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_cancels_its_generation(live, stream):
    """4096 tokens take about 10 s here; the client leaves once generation runs."""
    _idle(live, 10)
    before = {s: _metric(live, s) for s in ("200", "499")}
    body = json.dumps(_image(live, live.good_url, max_tokens=4096, ignore_eos=True,
                             temperature=0, stream=stream)).encode()  # fmt: skip
    s = socket.create_connection(("127.0.0.1", live.cluster.http_port), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
              b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
    deadline = time.monotonic() + 10
    while live.cluster.health()["engine"]["active"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    if stream:
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.close()
    assert _idle(live, 3) < 2.0  # cancelled, not run to the end
    deadline = time.monotonic() + 5
    while _metric(live, "499") < before["499"] + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _metric(live, "200") == before["200"]  # not counted as served
    _still_serving(live)


def _stream_text(live, body) -> list[str]:
    req = urllib.request.Request(live.cluster.url + "/v1/chat/completions",
                                 data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    pieces = []
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                pieces += [c["delta"].get("content", "") for c in chunk["choices"]]
    return [p for p in pieces if p]


def test_a_stop_string_spanning_two_tokens_never_leaks(live):
    body = _text("Count to twenty.", max_tokens=40, temperature=0, ignore_eos=True)
    pieces = _stream_text(live, body)  # one piece per token that completed some text
    text = "".join(pieces)
    stop = None
    for k in range(1, len(pieces)):
        edge = sum(map(len, pieces[:k]))
        candidate = text[edge - 1 : edge + 1]
        if "\ufffd" not in candidate and len(candidate) == 2 and text.index(candidate) == edge - 1:
            stop = candidate
            break
    assert stop is not None, pieces
    expected = text[: text.index(stop)]
    streamed = "".join(_stream_text(live, {**body, "stop": [stop, "never there"]}))
    status, whole = _chat(live, {**body, "stop": [stop, "never there"]})
    assert status == 200
    assert streamed == whole["choices"][0]["message"]["content"] == expected
    assert whole["choices"][0]["finish_reason"] == "stop"


def test_health_answers_fast_while_a_big_prompt_is_prepared(live):
    """Half a megabyte of text: tokenizing it takes about half a second here, on a worker
    thread; /health is polled throughout and must answer each time within 100 ms."""
    big = "hello world, " * 13_000  # 169 kB per part, three parts
    body = json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": big}]
                       * 3}], "max_tokens": 2}).encode()  # fmt: skip
    latencies: list[float] = []
    gc.disable()  # a collection in this (big) test process is no server latency
    try:
        with cf.ThreadPoolExecutor(1) as pool, httpx.Client(timeout=5) as http:
            t0 = time.monotonic()
            answer = pool.submit(_post, live.cluster.url, body, 60)
            while not answer.done():
                t = time.perf_counter()
                assert http.get(live.cluster.url + "/health").status_code == 200
                latencies.append(time.perf_counter() - t)
                time.sleep(0.02)
            elapsed = time.monotonic() - t0
    finally:
        gc.enable()
    status, reply = answer.result()
    assert status == 400 and "the limit is" in reply["error"]["message"]  # too many tokens
    assert elapsed > 0.3 and len(latencies) >= 10, (elapsed, latencies)  # it was busy a while
    assert max(latencies) < 0.1, sorted(latencies)[-5:]
    _still_serving(live)


# --- property-based fuzz ------------------------------------------------------------------

GOOD = "good image"  # replaced by a real data URL
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])  # fmt: skip
strings = st.one_of(
    st.text(st.characters(categories=["Cs", "L", "M", "N", "P", "S", "Z", "Cc", "Cf"]),
            max_size=12),  # lone surrogates too
    st.sampled_from([GOOD, "/etc/shadow", "a" * 300, "data:image/png;base64,!!", "\ud800",
                     "<|image_pad|>", "<|vision_start|>", "http://x/y.png", "cat.png", ""]),
)  # fmt: skip
leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80),
                   st.floats(allow_nan=True, allow_infinity=True), strings)  # fmt: skip
anything = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3),
    max_leaves=12,
)
words = st.text(st.characters(categories=["L", "N", "P", "Zs"]), max_size=16)
valid_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": words}),
    st.just({"type": "image_url", "image_url": {"url": GOOD}}),
    st.just({"type": "image", "image": GOOD}),
)
valid_messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]),
     "content": words | st.lists(valid_parts, min_size=1, max_size=3)})  # fmt: skip
bad_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": strings | anything}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.fixed_dictionaries({"url": strings}) | anything}),
    st.fixed_dictionaries({"type": st.just("image"), "image": strings | anything}),
    anything,
)  # fmt: skip
bad_messages = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "tool", ""]) | anything,
                           "content": strings | st.lists(bad_parts, max_size=4) | anything}),
    anything,
)  # fmt: skip
FIELDS = {
    "model": st.sampled_from([*NAMES, "x"]), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
    "seed": st.integers(-(2**63), 2**63 - 1), "stop": st.lists(words, max_size=4) | words,
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.just(1), "logprobs": st.just(False), "tools": st.just([]),
    "ignore_eos": st.booleans(), "add_generation_prompt": st.booleans(),
    "presence_penalty": st.just(0), "response_format": st.just({"type": "text"}),
    "max_completion_tokens": st.integers(1, 4),
}  # fmt: skip
valid_bodies = st.fixed_dictionaries(
    {"messages": st.lists(valid_messages, min_size=1, max_size=3),
     "max_tokens": st.integers(1, 4)},  # a valid body never generates for long
    optional=FIELDS,
)  # fmt: skip
TARGETS = ["messages", "message", "part", *FIELDS, "max_tokens", "max_tokens"]


@st.composite
def bodies(draw) -> dict:
    """A valid body with 0 to 2 of its fields, messages or parts replaced by anything."""
    body = draw(valid_bodies)
    for _ in range(draw(st.integers(0, 2))):
        target, junk = draw(st.sampled_from(TARGETS)), draw(anything)
        chat = body["messages"]
        if target == "max_tokens":  # never a valid large number: generation stays short
            body[target] = draw(st.sampled_from([0, -1, True, "3", 2.5, 2**64, [], -0.0]))
        elif target == "message" and isinstance(chat, list) and chat:
            chat[draw(st.integers(0, len(chat) - 1))] = draw(bad_messages)
        elif target == "part" and isinstance(chat, list) and chat:
            content = chat[0].get("content") if isinstance(chat[0], dict) else None
            if isinstance(content, list) and content:
                content[draw(st.integers(0, len(content) - 1))] = draw(bad_parts)
        elif target not in ("message", "part", "max_completion_tokens"):
            body[target] = junk
    return body


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.cluster.url, timeout=30) as client:
        yield client


def _fill(value, url: str):
    if value == GOOD:
        return url
    if isinstance(value, list):
        return [_fill(v, url) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, url) for k, v in value.items()}
    return value


@FUZZ
@given(body=bodies())
def test_fuzzed_bodies_never_get_a_500_or_hang(live, http, body):
    data = json.dumps(_fill(body, live.good_url)).encode()  # escapes surrogates, writes NaN
    r = http.post(
        "/v1/chat/completions", content=data, headers={"Content-Type": "application/json"}
    )  # fmt: skip (30 s deadline)
    assert r.status_code in (200, 400, 404, 413), (r.status_code, r.text[:500])
    event(f"HTTP {r.status_code}")
    if r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-500:]
    else:
        reply = r.json()
        assert r.status_code == 200 or isinstance(reply["error"]["message"], str)


def test_after_fuzzing_every_block_is_free_and_it_still_serves(live):
    _still_serving(live)
    health = live.cluster.health()
    assert health["requests"]["inflight"] == 0 and health["engine"]["active"] == 0
    assert _metric(live, "500") == 0.0
    assert all(p.poll() is None for p in live.cluster.procs.values())


def test_default_body_limit_fits_the_images_and_is_capped(tiny_model_dir):
    from language_server.config import LanguageConfig
    from protocol.messages import MAX_IMAGE_BYTES

    config = LanguageConfig(model=tiny_model_dir)
    assert config.body_limit == 64 << 20  # 16 images of 32 MiB would not fit: capped
    one = LanguageConfig(model=tiny_model_dir, max_images=1, max_image_bytes=3 << 20)
    assert one.body_limit == (4 << 20) + (1 << 20)  # the image in base64, plus 1 MiB of text
    assert config.image_policy().max_bytes <= MAX_IMAGE_BYTES
    assert config.image_policy().local_root is None  # local paths off by default
    with pytest.raises(ValueError, match="max-image-bytes"):
        LanguageConfig(model=tiny_model_dir, max_image_bytes=(32 << 20) + 1)  # the encoders'
    assert MAX_IMAGE_BYTES >= 32 << 20  # ... which fits one EncodeJob
