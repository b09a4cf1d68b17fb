"""Liveness that a busy encoder cannot fool: heartbeats are answered by the encoder's front
thread, never by the worker that runs preprocessing and the ViT."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import time

import numpy as np
import pytest
from PIL import Image

from epd.cluster import LocalCluster
from tests.faults.conftest import image_body

pytestmark = pytest.mark.slow


def _big_cheap_image(seed: int) -> str:
    """8000x6000 pixels in a few hundred KB: a smooth gradient. It decodes, resizes and
    patches like any photo of that size (about a second of one core)."""
    y, x = np.mgrid[0:6000, 0:8000]
    rgb = np.stack([(x + seed) % 256, (y + 2 * seed) % 256, (x + y) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_worker_busy_for_seconds_is_never_taken_for_dead(tiny_model_dir, make_image, tmp_path):
    dead_after = 0.5
    args = ["--heartbeat", "0.1", "--encoder-dead-after", str(dead_after), "--num-blocks", "1024"]
    # the encoder's cache off: else the second and third copies skip their preprocessing
    with LocalCluster(tiny_model_dir, n_encoders=1, log_dir=tmp_path, language_args=args,
                      encoder_args=["--no-image-cache"]) as c:  # fmt: skip
        url = _big_cheap_image(1)
        content = [{"type": "image_url", "image_url": {"url": url}}] * 3 + [
            {"type": "text", "text": "three huge images, each one long blocking preprocess"}
        ]
        heavy = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
        with cf.ThreadPoolExecutor(2) as pool:
            big = pool.submit(c.chat, heavy, 300)
            seen, deadline = [], time.monotonic() + 120
            while not big.done() and time.monotonic() < deadline:
                encoder = c.health()["encoders"][0]
                seen.append((encoder["state"], encoder["last_seen_s"]))
                time.sleep(0.1)
            status, reply = big.result(300)
        assert status == 200, reply
        busy = reply["epd"]["timings"]["preprocess_s"]
        assert busy > dead_after, f"one step of the worker took only {busy:.2f} s"
        assert {state for state, _ in seen} == {"up"}, seen
        assert max(s for _, s in seen if s is not None) < dead_after
        # and it serves the next request at once
        status, _ = c.chat(image_body(make_image))
        assert status == 200
        assert c.health()["requests"]["redispatched"] == 0


def test_a_killed_encoder_gets_no_job_after_the_first_failed_send(
    tiny_model_dir, make_image, tmp_path
):
    """No 5-second window of 503s: the first send that finds no connection marks it down."""
    args = ["--heartbeat", "1", "--encoder-dead-after", "30"]
    with LocalCluster(tiny_model_dir, n_encoders=2, log_dir=tmp_path, language_args=args) as c:
        c.kill("encoder-0")
        t0 = time.monotonic()
        results = [c.chat(image_body(make_image, seed=s), 20) for s in range(4)]
        elapsed = time.monotonic() - t0
        assert [s for s, _ in results] == [200] * 4, results
        states = {e["id"]: e["state"] for e in c.health()["encoders"]}
        assert states == {"encoder-0": "down", "encoder-1": "up"}, states
        assert elapsed < 10, f"{elapsed:.1f} s: a job waited for the liveness limit"
