"""Resident images end to end (issue 18), on both engines: a repeated image is served from the
rows kept in the pool, with exactly the tokens of a cold request and of transformers' model."""

from __future__ import annotations

import importlib.util
import re
import time
import urllib.request

import pytest

from epd.cluster import LocalCluster
from tests.e2e.test_servers import _body, _content, _monolithic_tokens

pytestmark = pytest.mark.slow

ENGINES = [
    "transformers",
    pytest.param("sglang", marks=pytest.mark.skipif(
        importlib.util.find_spec("sglang") is None, reason="SGLang is not installed")),
]  # fmt: skip


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request, tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp(f"cache-{request.param}-logs")
    with LocalCluster(
        tiny_model_dir, n_encoders=1, transport="mooncake", log_dir=logs, startup_timeout_s=240,
        language_args=["--engine", request.param, "--num-blocks", "32", "--block-tokens", "16",
                       "--image-cache-blocks", "-1"],
    ) as c:  # fmt: skip
        yield c


def _served(cluster, content):
    status, reply = cluster.chat(_body(content))
    assert status == 200, reply
    return reply["epd"]["token_ids"], reply["epd"]["timings"]


def test_a_repeated_image_skips_the_encoder_and_returns_the_same_tokens(
    cluster, monolithic, make_image
):
    served = {e["id"]: e["served"] for e in cluster.health()["encoders"]}
    ours, theirs = _content([(80, 112, 31)], make_image)
    cold, t_cold = _served(cluster, ours)
    assert cold == _monolithic_tokens(monolithic, theirs)
    assert t_cold["cached_images"] == 0 and t_cold["transfer_bytes"] > 0
    warm, t_warm = _served(cluster, ours)
    assert warm == cold
    assert t_warm["cached_images"] == 1 and t_warm["transfer_bytes"] == 0
    assert t_warm["cache_saved_bytes"] == t_cold["transfer_bytes"]
    after = {e["id"]: e["served"] for e in cluster.health()["encoders"]}
    assert sum(after.values()) - sum(served.values()) == 1  # the encoder saw it once
    if cluster.language_args[1] == "sglang":  # the images' hash lets SGLang reuse the prompt's KV
        assert t_warm["prefix_cached_tokens"] > t_cold["prefix_cached_tokens"]
        assert t_warm["prefix_cached_tokens"] >= t_warm["visual_tokens"]  # the image's KV too

    # a new image beside the resident one: only the new one is encoded; rows in prompt order
    mixed, mixed_theirs = _content([(96, 64, 32), (80, 112, 31)], make_image)
    tokens, t_mixed = _served(cluster, mixed)
    assert t_mixed["cached_images"] == 1 and t_mixed["images"] == 2
    assert tokens == _monolithic_tokens(monolithic, mixed_theirs)

    pool = cluster.health()["pool"]
    assert pool["image_cache"] and pool["resident_images"] == 2
    assert pool["resident_blocks"] == pool["idle_resident_blocks"] > 0  # nobody reads them now
    assert pool["free_blocks"] + pool["resident_blocks"] == pool["total_blocks"]
    assert pool["lent_blocks"] == 0 and pool["handed_blocks"] == 0
    with urllib.request.urlopen(cluster.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    hits = re.search(r"^epd_image_cache_hits_total (\S+)$", text, re.M)
    assert hits is not None and float(hits.group(1)) == 2.0
    assert re.search(r"^epd_image_cache_saved_bytes_total [1-9]", text, re.M)


def _by_encoder(cluster) -> dict[str, tuple[int, int]]:
    return {e["id"]: (e["served"], e["cache_hits"]) for e in cluster.health()["encoders"]}


def test_the_encoder_cache_serves_a_repeat_and_a_killed_holder_loses_nothing(
    tiny_model_dir, monolithic, make_image, tmp_path
):
    """Language side's cache off, so every repeat goes to an encoder: it goes to the one that
    encoded the image (its cache holds the rows: no ViT), with the same tokens; that encoder
    killed, the next repeat is encoded afresh by the other one, and nothing is lost."""
    fast = ["--heartbeat", "0.2", "--encoder-dead-after", "1", "--dead-writer-wait", "0.5"]
    with LocalCluster(
        tiny_model_dir, n_encoders=2, transport="mooncake", log_dir=tmp_path,
        language_args=["--no-image-cache", *fast],
    ) as c:  # fmt: skip
        ours, theirs = _content([(80, 112, 41)], make_image)
        expected = _monolithic_tokens(monolithic, theirs)
        cold, t_cold = _served(c, ours)
        assert cold == expected and t_cold["encoder_cached_images"] == 0
        holder = next(k for k, (served, _) in _by_encoder(c).items() if served == 1)
        for _ in range(2):  # the holder is preferred: both repeats are hits there
            again, t_again = _served(c, ours)
            assert again == expected and t_again["encoder_cached_images"] == 1
            assert t_again["transfer_bytes"] == t_cold["transfer_bytes"]  # rows still sent
        assert _by_encoder(c)[holder] == (3, 2)
        with urllib.request.urlopen(c.url + "/metrics", timeout=10) as r:
            assert re.search(r"^epd_encoder_cache_hits_total 2\.0$", r.read().decode(), re.M)

        c.kill(holder)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the language server has seen it go
            if {e["id"]: e["state"] for e in c.health()["encoders"]}[holder] != "up":
                break
            time.sleep(0.1)
        after, t_after = _served(c, ours)
        assert after == expected and t_after["encoder_cached_images"] == 0  # encoded afresh
        other = next(k for k in _by_encoder(c) if k != holder)
        assert _by_encoder(c)[other] == (1, 0)
        pool = c.health()["pool"]
        assert pool["available_blocks"] == pool["total_blocks"] and pool["lent_blocks"] == 0
