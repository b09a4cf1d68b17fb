"""Real processes killed, restarted and overloaded: every request ends, no block leaks."""

from __future__ import annotations

import concurrent.futures as cf
import signal
import time

import pytest

from epd.cluster import LocalCluster
from tests.faults.conftest import image_body

pytestmark = pytest.mark.slow
FAST = ["--heartbeat", "0.2", "--encoder-dead-after", "1", "--dead-writer-wait", "0.5"]


def _all_free(cluster, timeout=5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        pool = cluster.health()["pool"]
        if pool["available_blocks"] == pool["total_blocks"] or time.monotonic() > deadline:
            return pool
        time.sleep(0.1)


def _served(cluster) -> dict[str, int]:
    return {e["id"]: e["served"] for e in cluster.health()["encoders"]}


def test_encoder_killed_mid_request_moves_it_then_rejoins(tiny_model_dir, make_image, tmp_path):
    with LocalCluster(tiny_model_dir, n_encoders=2, log_dir=tmp_path, language_args=FAST) as c:
        # Freeze encoder-0 (it takes the request, then never answers), then kill it.
        c.procs["encoder-0"].send_signal(signal.SIGSTOP)
        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(c.chat, image_body(make_image, seed=i)) for i in range(4)]
            time.sleep(0.3)
            c.kill("encoder-0", signal.SIGKILL)
            results = [f.result(60) for f in futures]
        assert [s for s, _ in results] == [200] * 4, results
        health = c.health()
        assert health["requests"]["redispatched"] >= 1
        assert {e["id"]: e["state"] for e in health["encoders"]}["encoder-0"] == "down"
        assert _all_free(c)["available_blocks"] == health["pool"]["total_blocks"]
        # A restarted encoder (new Mooncake session, same address) rejoins and serves.
        c.start_encoder(0)
        c.wait_ready()
        before = _served(c)["encoder-0"]
        c.kill("encoder-1", signal.SIGKILL)
        time.sleep(1.5)  # encoder-1 marked down
        status, _ = c.chat(image_body(make_image, seed=9))
        assert status == 200 and _served(c)["encoder-0"] == before + 1
        # With every encoder gone, image requests fail clearly; text still works.
        c.kill("encoder-0", signal.SIGKILL)
        time.sleep(1.5)
        status, body = c.chat(image_body(make_image, seed=10))
        assert status == 503 and "no encode server" in body["error"]["message"]
        status, _ = c.chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 200
        assert _all_free(c)["available_blocks"] == c.health()["pool"]["total_blocks"]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_language_killed_and_restarted_encoder_drops_its_work(tiny_model_dir, make_image, tmp_path):
    enc_args = ["--peer-timeout", "1"]
    with LocalCluster(tiny_model_dir, n_encoders=1, log_dir=tmp_path, encoder_args=enc_args,
                      language_args=FAST) as c:  # fmt: skip
        encoder = c.procs["encoder-0"]
        rss = []
        for round_ in range(4):
            with cf.ThreadPoolExecutor(6) as pool:
                futures = [pool.submit(c.chat, image_body(make_image, 96, 96, seed=s))
                           for s in range(6)]  # fmt: skip
                time.sleep(0.15)
                c.kill("language", signal.SIGKILL)  # mid-request
                for f in futures:
                    try:
                        f.result(30)
                    except OSError:
                        pass  # connection reset: expected
            time.sleep(2.5)  # encoder notices (peer timeout) and drops the dead server's work
            rss.append(_rss_kib(encoder.pid))
            c.procs.pop("language")
            c.start_language()
            c.wait_ready()
            status, _ = c.chat(image_body(make_image, seed=100 + round_))
            assert status == 200
        log = (tmp_path / "encoder-0.log").read_text()
        assert "silent for" in log or "dropped" in log or "cannot send" in log
        assert rss[-1] - rss[1] < 40 * 1024, f"encoder RSS grew: {rss} KiB"


def test_overload_queues_then_503_and_too_large_gets_413(tiny_model_dir, make_image, tmp_path):
    args = ["--num-blocks", "4", "--block-tokens", "16", "--max-waiting-allocs", "2",
            "--alloc-wait", "3"]  # fmt: skip
    with LocalCluster(tiny_model_dir, n_encoders=1, log_dir=tmp_path, language_args=args) as c:
        # 224x224 -> 49 visual tokens -> 4 blocks: the whole pool, one request at a time.
        body = image_body(make_image, 224, 224, max_tokens=24)
        with cf.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: c.chat(body), range(12)))
        codes = sorted(s for s, _ in results)
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        busy = [b for s, b in results if s == 503]
        assert all("retry later" in b["error"]["message"] or "freed up" in b["error"]["message"]
                   for b in busy)  # fmt: skip
        assert c.health()["pool"]["peak_used_blocks"] <= 4
        t0 = time.monotonic()
        status, reply = c.chat(image_body(make_image, 320, 320))  # 100 tokens > 64
        assert status == 413 and "need 7 blocks" in reply["error"]["message"]
        assert time.monotonic() - t0 < 5
        assert _all_free(c)["available_blocks"] == 4
        status, _ = c.chat(body)
        assert status == 200


def test_encoder_restarted_within_the_liveness_window_loses_no_request(
    tiny_model_dir, make_image, tmp_path
):
    """Killed with jobs in hand and back before anyone declared it dead: the new process's
    incarnation tells the language side at once that the old jobs are gone; they are sent again
    (to the restarted encoder, the only one) and every request succeeds."""
    args = ["--heartbeat", "0.2", "--encoder-dead-after", "120"]
    with LocalCluster(tiny_model_dir, n_encoders=1, log_dir=tmp_path, language_args=args) as c:
        incarnation = c.health()["encoders"][0]["incarnation"]
        c.procs["encoder-0"].send_signal(signal.SIGSTOP)  # takes the jobs, never answers
        with cf.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(c.chat, image_body(make_image, seed=i)) for i in range(3)]
            deadline = time.monotonic() + 10
            while c.health()["pool"]["pending_requests"] < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.health()["encoders"][0]["inflight"] == 3
            c.kill("encoder-0", signal.SIGKILL)
            c.start_encoder(0)
            results = [f.result(120) for f in futures]
        assert [s for s, _ in results] == [200] * 3, results
        health = c.health()
        encoder = health["encoders"][0]
        assert encoder["state"] == "up" and encoder["incarnation"] != incarnation
        assert health["requests"]["redispatched"] >= 1
        assert _all_free(c)["available_blocks"] == health["pool"]["total_blocks"]
