"""End to end with real processes: encode servers + language server over Mooncake (TCP)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import urllib.request

import pytest
import torch

from epd.cluster import LocalCluster
from tests.e2e.conftest import data_url

pytestmark = pytest.mark.slow
N_TOKENS = 8

# name -> list of (height, width, seed); non-square, all different; "long" spans > 3 blocks of 16
PROMPTS = {
    "text_only": [],
    "one_image": [(80, 112, 1)],
    "two_images": [(200, 96, 2), (96, 160, 3)],
    "long_image": [(224, 320, 4)],
}


def _content(spec, make_image, as_path=None):
    """(OpenAI content for the server, content with PIL images for transformers)."""
    ours, theirs = [], []
    for k, (h, w, seed) in enumerate(spec):
        image = make_image(h, w, seed)
        url = data_url(image)
        if as_path is not None and k == 0:
            path = as_path / f"image-{seed}.png"
            image.save(path)
            url = str(path)
        ours += [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": f"{k}."},
        ]
        theirs += [{"type": "image", "image": image}, {"type": "text", "text": f"{k}."}]
    text = {"type": "text", "text": "What is in the picture?"}
    return [*ours, text], [*theirs, text]


def _body(content, **extra):
    return {"messages": [{"role": "user", "content": content}],
            "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True, **extra}  # fmt: skip


def _monolithic_tokens(monolithic, content):
    """transformers' greedy tokens, with the processor of the checkpoint ``monolithic`` came from."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(monolithic.name_or_path)
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True,
        return_dict=True, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        out = monolithic.generate(
            **inputs, max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS, do_sample=False
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("name", list(PROMPTS))
def test_served_greedy_tokens_equal_monolithic(name, cluster, monolithic, encoder, make_image):
    ours, theirs = _content(PROMPTS[name], make_image, as_path=cluster.media_dir)
    status, reply = cluster.chat(_body(ours))
    assert status == 200, reply
    expected = _monolithic_tokens(monolithic, theirs)
    assert reply["epd"]["token_ids"] == expected
    assert reply["usage"]["completion_tokens"] == N_TOKENS
    assert reply["choices"][0]["finish_reason"] == "length"
    if PROMPTS[name]:
        assert reply["epd"]["timings"]["transfer_s"] > 0
    else:
        assert "transfer_s" not in reply["epd"]["timings"]  # no encoder involved


def test_sixteen_concurrent_requests_use_both_encoders_and_free_every_block(cluster, make_image):
    before = {e["id"]: e["served"] for e in cluster.health()["encoders"]}
    bodies = [_body(_content([(64 + 32 * (i % 3), 96, 10 + i)], make_image)[0]) for i in range(16)]
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(cluster.chat, bodies))
    assert [status for status, _ in results] == [200] * 16, results
    assert all(len(r["epd"]["token_ids"]) == N_TOKENS for _, r in results)
    health = cluster.health()
    served = {e["id"]: e["served"] - before[e["id"]] for e in health["encoders"]}
    assert sum(served.values()) == 16
    assert all(n > 0 for n in served.values()), served
    pool_state = health["pool"]
    assert pool_state["available_blocks"] == pool_state["total_blocks"]
    assert pool_state["pending_requests"] == 0 and pool_state["waiting_requests"] == 0


def test_streaming_equals_non_streaming(cluster, make_image):
    content, _ = _content([(96, 64, 7)], make_image)
    _, whole = cluster.chat(_body(content))
    req = urllib.request.Request(
        cluster.url + "/v1/chat/completions",
        data=json.dumps(
            _body(content, stream=True, stream_options={"include_usage": True})
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    chunks = []
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == N_TOKENS
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == "length"


def test_openai_client_library(cluster, make_image):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused")
    model = cluster.health()["model"]
    assert [m.id for m in client.models.list().data] == [model]
    content, _ = _content([(80, 80, 8)], make_image)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=4,
        temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert reply.usage.completion_tokens == 4
    assert reply.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) >= 2


@pytest.mark.parametrize(
    "content, message",
    [
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], "decode"),
        ([{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}], "scheme"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}], "base64"),
        ([{"type": "video", "video": "x"}], "type"),
    ],
)
def test_bad_input_gets_400_with_a_reason(cluster, content, message):
    status, reply = cluster.chat(_body(content))
    assert status == 400, reply
    assert message in reply["error"]["message"]
    assert cluster.health()["pool"]["available_blocks"] == cluster.health()["pool"]["total_blocks"]


def test_too_many_images_and_bad_params(cluster, make_image):
    url = data_url(make_image(32, 32, 0))
    many = [{"type": "image_url", "image_url": {"url": url}}] * 17
    status, reply = cluster.chat(_body(many))
    assert status == 400 and "too many images" in reply["error"]["message"]
    status, reply = cluster.chat(_body("hi", max_tokens=0))
    assert status == 400 and "max_tokens" in reply["error"]["message"]
    status, reply = cluster.chat({"messages": "nope"})
    assert status == 400


def test_metrics_and_health(cluster):
    with urllib.request.urlopen(cluster.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "epd_requests_total" in text and "epd_ttft_seconds_bucket" in text
    assert "epd_pool_free_blocks" in text
    health = cluster.health()
    assert {e["state"] for e in health["encoders"]} == {"up"}
    assert health["pool"]["block_tokens"] == 16


def test_shm_transport_end_to_end(tiny_model_dir, monolithic, encoder, make_image, tmp_path):
    ours, theirs = _content(PROMPTS["long_image"], make_image)
    with LocalCluster(tiny_model_dir, n_encoders=1, transport="shm", log_dir=tmp_path,
                      language_args=["--block-tokens", "16"]) as c:  # fmt: skip
        status, reply = c.chat(_body(ours))
        assert status == 200, reply
        assert c.health()["pool"]["available_blocks"] == c.health()["pool"]["total_blocks"]
    expected = _monolithic_tokens(monolithic, theirs)
    assert reply["epd"]["token_ids"] == expected


def test_stop_strings_cut_the_answer(cluster):
    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    status, whole = cluster.chat(body)
    text = whole["choices"][0]["message"]["content"]
    assert status == 200 and len(text) >= 4
    stop = next(
        ch for ch in text[2:] if ch != "\ufffd"
    )  # tiny vocab: some tokens are partial bytes
    status, cut = cluster.chat({**body, "stop": [stop]})
    assert status == 200
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_three_images_are_spread_over_both_encoders_and_equal_monolithic(
    cluster, monolithic, make_image
):
    """One request, three images: each is its own encode job, and the jobs go to both encoders
    at once (the language side prepared the prompt; the encoders only saw image bytes)."""
    spec = [(96, 64, 31), (64, 128, 32), (160, 96, 33)]
    ours, theirs = _content(spec, make_image)
    before = {e["id"]: e["served"] for e in cluster.health()["encoders"]}
    status, reply = cluster.chat(_body(ours))
    assert status == 200, reply
    assert reply["epd"]["token_ids"] == _monolithic_tokens(monolithic, theirs)
    health = cluster.health()
    served = {e["id"]: e["served"] - before[e["id"]] for e in health["encoders"]}
    assert sum(served.values()) == 3 and all(n >= 1 for n in served.values()), served
    assert health["pool"]["available_blocks"] == health["pool"]["total_blocks"]


def test_text_only_and_image_prompts_share_one_template(cluster, make_image):
    """The tokens around an image equal the text-only prompt's, and add_generation_prompt is
    honoured on both (prompt_tokens differ by exactly the image's tokens plus its markers)."""
    text = [{"type": "text", "text": "What is in the picture?"}]
    ours, _ = _content([(64, 64, 5)], make_image)  # 4 visual tokens
    counts = {}
    for name, content in (("text", text), ("image", ours)):
        for gen in (True, False):
            body = _body(content, max_tokens=1, add_generation_prompt=gen)
            status, reply = cluster.chat(body)
            assert status == 200, reply
            counts[name, gen] = reply["usage"]["prompt_tokens"]
    # "<|vision_start|>" + 4 pads + "<|vision_end|>" + "0." (the tiny tokenizer is byte-level)
    assert counts["image", True] - counts["text", True] == 1 + 4 + 1 + 2
    assert (
        counts["text", True] - counts["text", False]
        == counts["image", True] - counts["image", False]
        > 0
    )
