from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import subprocess
import time

import pytest

from epd.cluster import free_port, get_json, post_json, script
from tests.faults.scripted import ScriptedEncoder


def image_body(make_image, h=64, w=64, seed=0, max_tokens=2, **extra):
    buf = io.BytesIO()
    make_image(h, w, seed).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, **extra}  # fmt: skip


class Language:
    """One epd-language process pointed at given encoder addresses."""

    def __init__(self, model, encoders, log_path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = script("epd-language") + ["--model", str(model), "--port", str(self.port), *args]
        for addr in encoders:
            cmd += ["--encoder", addr]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MC_LOG_LEVEL": "ERROR"}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_up(self, n_up: int = 1, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "language server exited"
            try:
                health = get_json(self.url + "/health", timeout=2)
                if sum(e["state"] == "up" for e in health["encoders"]) >= n_up:
                    return health
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("language server not ready")

    def chat(self, body, timeout: float = 60.0):
        return post_json(self.url + "/v1/chat/completions", body, timeout)

    def chat_async(self, body):
        pool = cf.ThreadPoolExecutor(1)
        return pool.submit(self.chat, body)

    def health(self) -> dict:
        return get_json(self.url + "/health")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def scripted(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    enc = ScriptedEncoder(config["image_token_id"], config["text_config"]["hidden_size"])
    yield enc
    enc.close()


@pytest.fixture
def language_for(tiny_model_dir, tmp_path):
    started = []

    def start(encoders, *args: str) -> Language:
        lang = Language(tiny_model_dir, encoders, tmp_path / f"language-{len(started)}.log", *args)
        started.append(lang)
        return lang

    yield start
    for lang in started:
        lang.stop()
