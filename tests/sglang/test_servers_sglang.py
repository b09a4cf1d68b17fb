"""The end-to-end server tests of ``tests/e2e/test_servers.py``, with ``epd-language --engine sglang``.

The same test functions run against a cluster whose language server generates with SGLang's
engine (``Qwen3MoeForCausalLMWithDeepStack`` from ``language_server.engines.sglang.models``) instead of
the transformers reference: two encode servers, Mooncake over TCP, 16-token blocks. The greedy
tokens must still equal transformers' monolithic model, through the HTTP API.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from epd.cluster import LocalCluster
from tests.e2e.conftest import data_url
from tests.e2e.test_servers import (  # noqa: F401 - collected here, against the SGLang cluster
    PROMPTS,
    _body,
    _content,
    _monolithic_tokens,
    test_bad_input_gets_400_with_a_reason,
    test_metrics_and_health,
    test_openai_client_library,
    test_served_greedy_tokens_equal_monolithic,
    test_sixteen_concurrent_requests_use_both_encoders_and_free_every_block,
    test_streaming_equals_non_streaming,
    test_three_images_are_spread_over_both_encoders_and_equal_monolithic,
    test_too_many_images_and_bad_params,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("sglang") is None,
        reason="SGLang is not installed: bash scripts/setup_sglang.sh",
    ),
]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    """Like tests/e2e's cluster, with ``--engine sglang`` and small prefill chunks (module scope:
    SGLang's processes stop when this module is done)."""
    logs = tmp_path_factory.mktemp("sglang-cluster-logs")
    with LocalCluster(
        tiny_model_dir, n_encoders=2, transport="mooncake", log_dir=logs, startup_timeout_s=240,
        language_args=["--engine", "sglang", "--num-blocks", "64", "--block-tokens", "16",
                       # prefill in chunks of 32 tokens: an image's rows span several chunks
                       "--sglang-args", '{"chunked_prefill_size": 32}'],
    ) as c:  # fmt: skip
        yield c


def test_the_language_server_runs_sglang(cluster):
    log = (cluster.log_dir / "language.log").read_text(errors="replace")
    assert "starting SGLang's engine" in log
    assert "type=Qwen3MoeForCausalLMWithDeepStack" in log  # SGLang's "Load weight end" line


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_the_pool_lives_in_the_scheduler_and_each_visual_row_is_copied_once(cluster, make_image):
    """The receive pool is allocated and registered in SGLang's scheduler process; the front
    door holds no pool memory and never loads the transport; every visual row of every request
    is copied exactly once, from the pool into the model's inputs."""
    import psutil

    language = psutil.Process(cluster.procs["language"].pid)
    pool = cluster.health()["pool"]
    host = pool["host_pid"]
    assert host != language.pid
    assert host in {p.pid for p in language.children(recursive=True)}
    assert "scheduler" in " ".join(psutil.Process(host).cmdline() + [psutil.Process(host).name()])
    assert "mooncake" in _maps(host)  # the transport registered the pool there...
    assert "mooncake" not in _maps(language.pid)  # ...and was never loaded in the front door
    images = [[(64, 96, 31)], [(224, 320, 32), (96, 64, 33), (80, 112, 34)]]
    for spec in images:
        before = cluster.health()["pool"]
        content = [{"type": "image_url", "image_url": {"url": data_url(make_image(h, w, seed))}}
                   for h, w, seed in spec] + [{"type": "text", "text": "Describe."}]  # fmt: skip
        status, reply = cluster.chat({"messages": [{"role": "user", "content": content}],
                                      "max_tokens": 4, "temperature": 0})  # fmt: skip
        assert status == 200, reply
        after = cluster.health()["pool"]
        n_visual = reply["epd"]["timings"]["visual_tokens"]
        assert n_visual > 16 * len(spec) - 16  # spans blocks
        assert after["rows_copied"] - before["rows_copied"] == n_visual
        assert after["verified"] - before["verified"] == len(spec)
        assert after["available_blocks"] == after["total_blocks"]


def test_concurrent_requests_decode_in_one_batch_on_a_scheduler_with_our_torch_threads(
    cluster, make_image
):
    """Issue 20: four requests sent at once (the reporter's client: four threads sharing one
    kept-alive httpx client, non-streamed, greedy, ``ignore_eos``) decode together: the mean
    decode batch of SGLang's scheduler over the window is well above 1 (one after another it
    would be 1), and the scheduler runs with the server's ``--torch-threads`` (1 here), not one
    thread per core (its OpenMP workers then oversubscribed a host shared with encoders). The
    answers are the same for the same image whether batched or not."""
    import httpx

    n, tokens = 4, 64
    image = {"type": "image_url", "image_url": {"url": data_url(make_image(96, 128, 36))}}
    body = {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "Hi"}]}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": False}  # fmt: skip
    status, alone = cluster.chat(body)
    assert status == 200, alone
    before = cluster.health()["pool"]
    gate = threading.Barrier(n)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    with httpx.Client(base_url=cluster.url, timeout=120, limits=limits) as client:

        def send(_: int) -> dict:
            gate.wait(timeout=30)
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            return reply.json()

        with ThreadPoolExecutor(n) as pool:
            replies = list(pool.map(send, range(n)))
    after = cluster.health()["pool"]
    assert after["torch_threads"] == 1, after
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    assert rows == n * (tokens - 1), (rows, steps)  # the first token of each comes from prefill
    assert rows / steps >= 2.5, f"mean decode batch {rows / steps:.2f} over {steps} steps"
    assert all(r["epd"]["token_ids"] == alone["epd"]["token_ids"] for r in replies)
    assert after["available_blocks"] == after["total_blocks"]


def test_a_client_that_leaves_mid_generation_gives_every_block_back(cluster, make_image):
    image = {"type": "image_url", "image_url": {"url": data_url(make_image(96, 96, 35))}}
    body = json.dumps({"messages": [{"role": "user", "content": [image]}], "max_tokens": 2048,
                       "ignore_eos": True, "stream": True}).encode()  # fmt: skip
    port = int(cluster.url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
              b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
    deadline = time.monotonic() + 60
    while cluster.health()["pool"]["handed_blocks"] == 0:  # rows handed to SGLang
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.close()
    deadline = time.monotonic() + 30
    while (pool := cluster.health()["pool"])["available_blocks"] != pool["total_blocks"]:
        assert time.monotonic() < deadline, pool
        time.sleep(0.05)
    status, reply = cluster.chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200, reply


def test_tensor_parallel_2_on_cpu_rank_0_holds_the_pool_and_broadcasts_the_rows(
    tiny_model_dir, monolithic, make_image, tmp_path
):
    """TP 2 (gloo between the two CPU ranks): the encoder writes into rank 0's pool only; rank 0
    copies each row once and broadcasts it to rank 1. Rank 1 computes half of every layer, so
    rows missing there would change the tokens."""
    with LocalCluster(tiny_model_dir, n_encoders=1, transport="mooncake", log_dir=tmp_path,
                      startup_timeout_s=300, language_args=[
                          "--engine", "sglang", "--block-tokens", "16", "--sglang-args",
                          '{"tp_size": 2, "chunked_prefill_size": 32}']) as c:  # fmt: skip
        total = 0
        for name in ("two_images", "long_image"):
            ours, theirs = _content(PROMPTS[name], make_image)
            status, reply = c.chat(_body(ours))
            assert status == 200, reply
            assert reply["epd"]["token_ids"] == _monolithic_tokens(monolithic, theirs), name
            total += reply["epd"]["timings"]["visual_tokens"]
        pool = c.health()["pool"]
        assert pool["rows_copied"] == total and pool["available_blocks"] == pool["total_blocks"]
        log = (tmp_path / "language.log").read_text(errors="replace")
        assert log.count("receive pool in the scheduler process") == 1  # rank 0 only


def test_a_dead_sglang_scheduler_stops_the_language_server(tiny_model_dir, tmp_path):
    """SGLang's watchdog SIGQUITs the server when its scheduler dies; the server exits with 70."""
    import psutil

    with LocalCluster(tiny_model_dir, n_encoders=0, transport="shm", log_dir=tmp_path,
                      startup_timeout_s=240, language_args=["--engine", "sglang"]) as c:  # fmt: skip
        language = c.procs["language"]
        children = psutil.Process(language.pid).children()
        schedulers = [p for p in children if "scheduler" in " ".join(p.cmdline() + [p.name()])]
        assert schedulers, [(p.pid, p.name(), p.cmdline()) for p in children]
        schedulers[0].kill()
        assert language.wait(timeout=60) == 70
        assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_cpu_defaults_keep_an_idle_scheduler_asleep(tiny_model_dir):
    from language_server.config import LanguageConfig
    from language_server.engines.sglang.launch import engine_args

    args = engine_args(LanguageConfig(model=tiny_model_dir, engine="sglang"))
    assert args["sleep_on_idle"] is True and args["device"] == "cpu"
    assert "epd_torch_threads" not in json.loads(args["json_model_override_args"])


def test_torch_threads_reach_the_scheduler_through_the_model_config(tiny_model_dir):
    from language_server.config import LanguageConfig
    from language_server.engines.sglang.launch import engine_args

    config = LanguageConfig(model=tiny_model_dir, engine="sglang", torch_threads=3)
    assert json.loads(engine_args(config)["json_model_override_args"])["epd_torch_threads"] == 3


def test_settings_the_pool_cannot_serve_are_refused_and_gpus_skip_prefill_graphs(tiny_model_dir):
    from language_server.config import LanguageConfig
    from language_server.engines.sglang.launch import _check_pool_args, engine_args

    config = LanguageConfig(model=tiny_model_dir, engine="sglang")
    _check_pool_args(engine_args(config, {"address": "ipc:///x"}, tp_size=2, pp_size=2))
    for bad in ({"dp_size": 2}, {"attn_dp_size": 2}, {"enable_dp_attention": True},
                {"speculative_algorithm": "EAGLE"}):  # fmt: skip
        with pytest.raises(ValueError, match="does not support"):
            _check_pool_args(engine_args(config, {"address": "ipc:///x"}, **bad))
    gpu = LanguageConfig(model=tiny_model_dir, engine="sglang", device="cuda:1")
    args = engine_args(gpu)
    assert args["disable_prefill_cuda_graph"] is True and args["base_gpu_id"] == 1
    assert "sleep_on_idle" not in args
