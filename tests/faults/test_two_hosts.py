"""Two hosts and a bad network: the encoder in one network namespace, the language server in
another, joined by a veth pair; then packet loss (iptables statistic), a bandwidth cap (tc tbf)
and a partition (link down, then up). Requests complete or fail clearly; nothing leaks; service
resumes after the partition heals. Needs root and iproute2/iptables (CI runs as root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from epd.cluster import script

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and ip"),
]
ENC_IP, LANG_IP, PORT, HTTP = "10.231.7.1", "10.231.7.2", 7411, 8411
CLIENT = r"""
import json, sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], data=sys.stdin.buffer.read(),
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=float(sys.argv[2])) as r:
        print(json.dumps({"status": r.status, "body": json.loads(r.read())}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": json.loads(e.read() or b"{}")}))
except Exception as e:
    print(json.dumps({"status": 0, "body": {"error": repr(e)}}))
"""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Hosts:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.enc, self.lang = f"epd-enc-{tag}", f"epd-lang-{tag}"
        self.veth_e, self.veth_l = f"ve{tag}", f"vl{tag}"
        for ns in (self.enc, self.lang):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.veth_e, "netns", self.enc, "type", "veth",
           "peer", "name", self.veth_l, "netns", self.lang)  # fmt: skip
        for ns, dev, ip in ((self.enc, self.veth_e, ENC_IP), (self.lang, self.veth_l, LANG_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")

    def run(self, ns: str, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kw)

    def exec(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", ns, *cmd, check=check)

    def chat(self, body: dict, timeout: float = 30.0) -> dict:
        url = f"http://127.0.0.1:{HTTP}/v1/chat/completions"
        proc = subprocess.run(["ip", "netns", "exec", self.lang, sys.executable, "-c", CLIENT, url,
                               str(timeout)], input=json.dumps(body).encode(), capture_output=True,
                              timeout=timeout + 30)  # fmt: skip
        return json.loads(proc.stdout)

    def health(self) -> dict:
        reply = self.exec(self.lang, sys.executable, "-c",
                          f"import urllib.request;print(urllib.request.urlopen("
                          f"'http://127.0.0.1:{HTTP}/health',timeout=5).read().decode())")  # fmt: skip
        return json.loads(reply.stdout)

    def close(self) -> None:
        for ns in (self.enc, self.lang):
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def hosts(tiny_model_dir, tmp_path):
    h = Hosts()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MC_LOG_LEVEL": "ERROR", "MC_FORCE_TCP": "1"}
    procs = []
    try:
        with open(tmp_path / "encoder.log", "wb") as log:
            procs.append(h.run(h.enc, *script("epd-encode"), "--model", str(tiny_model_dir),
                               "--host", ENC_IP, "--port", str(PORT), "--peer-timeout", "30",
                               stdout=log, stderr=subprocess.STDOUT, env=env))  # fmt: skip
        with open(tmp_path / "language.log", "wb") as log:
            procs.append(h.run(h.lang, *script("epd-language"), "--model", str(tiny_model_dir),
                               "--port", str(HTTP), "--encoder", f"tcp://{ENC_IP}:{PORT}",
                               "--advertise-host", LANG_IP, "--heartbeat", "0.3",
                               "--encoder-dead-after", "2", "--request-timeout", "12",
                               "--dead-writer-wait", "1", "--block-tokens", "16",
                               stdout=log, stderr=subprocess.STDOUT, env=env))  # fmt: skip
        deadline = time.monotonic() + 90
        while True:
            try:
                if h.health()["encoders"][0]["state"] == "up":
                    break
            except (json.JSONDecodeError, KeyError, IndexError, subprocess.CalledProcessError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "language.log").read_text()[-3000:]
            time.sleep(0.3)
        yield h
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        h.close()


def _body(make_image, seed, size=(96, 128)):
    from tests.faults.conftest import image_body

    return image_body(make_image, *size, seed=seed, max_tokens=2)


def _wait_free(h: Hosts, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        pool = h.health()["pool"]
        if pool["free_blocks"] == pool["total_blocks"] and pool["pending_requests"] == 0:
            return pool
        assert time.monotonic() < deadline, pool
        time.sleep(0.3)


def test_loss_bandwidth_cap_and_partition(hosts, make_image):
    h = hosts
    assert h.chat(_body(make_image, 0))["status"] == 200
    # 1. 5% random packet loss on both hosts: every request ends, 200 or a clear error.
    for ns in (h.enc, h.lang):
        h.exec(ns, "iptables", "-A", "INPUT", "-m", "statistic", "--mode", "random",
               "--probability", "0.05", "-j", "DROP")  # fmt: skip
    statuses = [h.chat(_body(make_image, i))["status"] for i in range(1, 7)]
    assert set(statuses) <= {200, 502, 503, 504} and statuses.count(200) >= 3, statuses
    for ns in (h.enc, h.lang):
        h.exec(ns, "iptables", "-F", "INPUT")
    _wait_free(h)
    # 2. A 2 Mbit/s cap on the encoder's link: slower, still correct. A 448x448 image is 196
    # visual tokens x 1 KiB (float32, H=64): ~200 KB, at least 0.8 s through the cap.
    h.exec(h.enc, "tc", "qdisc", "add", "dev", h.veth_e, "root", "tbf", "rate", "2mbit",
           "burst", "32kbit", "latency", "400ms")  # fmt: skip
    reply = h.chat(_body(make_image, 20, (448, 448)))
    assert reply["status"] == 200, reply
    capped_s = reply["body"]["epd"]["timings"]["transfer_s"]
    assert capped_s > 0.4, f"the cap did not slow the transfer ({capped_s:.3f} s)"
    h.exec(h.enc, "tc", "qdisc", "del", "dev", h.veth_e, "root")
    # 3. Partition: requests fail clearly (no hang), nothing leaks.
    h.exec(h.enc, "ip", "link", "set", h.veth_e, "down")
    cut = h.chat(_body(make_image, 30), timeout=40)
    assert cut["status"] in (503, 504), cut
    time.sleep(2.5)  # heartbeats lost: the encoder is marked down
    assert h.health()["encoders"][0]["state"] == "down"
    fast = h.chat(_body(make_image, 31), timeout=40)
    assert fast["status"] == 503 and "no encode server" in fast["body"]["error"]["message"]
    # 4. Heal: the encoder is seen again and serves.
    h.exec(h.enc, "ip", "link", "set", h.veth_e, "up")
    deadline = time.monotonic() + 60
    while True:
        reply = h.chat(_body(make_image, 40), timeout=20)
        if reply["status"] == 200:
            break
        assert time.monotonic() < deadline, reply
        time.sleep(1.0)
    pool = _wait_free(h)
    print(f"loss statuses {statuses}; capped transfer {capped_s:.2f} s; pool after {pool}")
