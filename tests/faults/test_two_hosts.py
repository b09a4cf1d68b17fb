"""The two-node recipe, run as README.md writes it: two network namespaces stand for node A
(the encoder) and node B (the language server), joined by a veth pair (the "fabric"); a second
veth pair joins node B to the host namespace, where the client runs (through a route to node B's
fabric address, so the client commands run unchanged too).

The steps come from deploy/two-node.toml, which README.md's section is generated from: keys,
node A, node B and client run through bash as written, except for what a CPU machine needs
(``--device cpu``, ``--dtype float32``, TCP instead of RDMA) and the namespaces' addresses and
model directory. Then the same on a link capped at 2 Mbit/s that drops 5% of packets; then a
partition of the link, and its healing. Needs root, iproute2, iptables and curl (CI runs as root;
scripts/setup.sh installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import tomllib

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("curl"),
        reason="needs root, iproute2 and curl (scripts/setup.sh installs them)",
    ),
]
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "deploy" / "two-node.toml"
NODE_A, NODE_B = "10.0.0.1", "10.0.0.2"  # the recipe's addresses
A_IP, B_IP = "10.231.7.1", "10.231.7.2"  # ... and the namespaces' (the fabric link)
HOST_IP, B_FRONT = "10.231.8.1", "10.231.8.2"  # the host namespace's link to node B
# What a CPU machine changes in the recipe (each must occur in it): the only edits.
FOR_CPU = {
    " --device cuda:0": " --device cpu",
    " --dtype bfloat16": " --dtype float32",
    " --mooncake-protocol rdma": " --mooncake-protocol tcp",
    " --mooncake-device mlx5_0": "",
    NODE_A: A_IP,
    NODE_B: B_IP,
}
RUN_STEPS = ("keys", "node-a", "node-b", "client")  # not "install": .venv has the CPU builds


def recipe_steps() -> dict[str, str]:
    """Step id -> its shell text, as deploy/two-node.toml (and so README.md) has it."""
    return {s["id"]: s["run"].strip() for s in tomllib.loads(RECIPE.read_text())["step"]}


def for_cpu(text: str, models: Path) -> str:
    """``text`` with only the FOR_CPU edits and /models/ -> ``models``."""
    for old, new in {**FOR_CPU, "/models/": f"{models}/"}.items():
        text = text.replace(old, new)
    return text


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def http(url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    """GET (or POST ``body``) without any proxy from the environment: (status, JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError as e:
        return 0, {"error": repr(e)}


def json_documents(text: str) -> list[dict]:
    """The JSON documents printed one after another (curl -s adds no newline)."""
    decoder, docs, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        doc, i = decoder.raw_decode(text, i)
        docs.append(doc)
    return docs


class Nodes:
    """Namespaces node A and node B, a fabric veth pair between them, a veth pair from the host
    namespace to node B (with a route to node B's fabric address), and the recipe's processes."""

    def __init__(self, workdir: Path) -> None:
        tag = uuid.uuid4().hex[:6]
        self.workdir = workdir
        self.a, self.b = f"epd-a-{tag}", f"epd-b-{tag}"
        self.fab_a, self.fab_b, self.front_h, self.front_b = (f"{p}{tag}" for p in "abhf")
        self.procs: dict[str, subprocess.Popen] = {}
        for ns in (self.a, self.b):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.fab_a, "netns", self.a, "type", "veth",
           "peer", "name", self.fab_b, "netns", self.b)  # fmt: skip
        sh("ip", "link", "add", self.front_h, "type", "veth",
           "peer", "name", self.front_b, "netns", self.b)  # fmt: skip
        for ns, dev, addr in ((self.a, self.fab_a, A_IP), (self.b, self.fab_b, B_IP),
                              (self.b, self.front_b, B_FRONT)):  # fmt: skip
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", self.front_h)
        sh("ip", "link", "set", self.front_h, "up")
        sh("ip", "route", "add", f"{B_IP}/32", "via", B_FRONT)
        self.url = f"http://{B_IP}:8000"

    def env(self) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)  # epd-encode, epd-language, epd-keys
        return {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
                "MC_LOG_LEVEL": "ERROR", "no_proxy": "*", "NO_PROXY": "*"}  # fmt: skip

    def run(self, text: str, timeout: float = 120.0) -> str:
        """A step in the host namespace, through bash, in the working directory: its stdout."""
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=self.workdir,
                              env=self.env(), capture_output=True, text=True, timeout=timeout)  # fmt: skip
        assert proc.returncode == 0, f"{text}\nexited {proc.returncode}:\n{proc.stderr[-3000:]}"
        return proc.stdout

    def start(self, name: str, ns: str, text: str) -> None:
        """A server step in namespace ``ns``, through bash, logging to ``name``.log."""
        with open(self.workdir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                ["ip", "netns", "exec", ns, "bash", "-c", text], cwd=self.workdir, env=self.env(),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait_up(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        health: dict = {}
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{self.log(name)}"
            status, health = http(self.url + "/health", timeout=3)
            if status == 200 and [e["state"] for e in health["encoders"]] == ["up"]:
                return health
            time.sleep(0.3)
        raise AssertionError(f"not up in {timeout} s: {health}\n{self.log('node-b')}")

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def degrade(self, loss: float, rate: str) -> None:
        """Both ends of the fabric link: drop ``loss`` of incoming packets, cap to ``rate``."""
        for ns, dev in ((self.a, self.fab_a), (self.b, self.fab_b)):
            sh("ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-i", dev, "-m", "statistic",
               "--mode", "random", "--probability", str(loss), "-j", "DROP")  # fmt: skip
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
               "rate", rate, "burst", "32kbit", "latency", "400ms")  # fmt: skip

    def link(self, up: bool) -> None:
        sh("ip", "-n", self.a, "link", "set", self.fab_a, "up" if up else "down")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        sh("ip", "route", "del", f"{B_IP}/32", check=False)
        sh("ip", "link", "del", self.front_h, check=False)
        for ns in (self.a, self.b):
            sh("ip", "netns", "del", ns, check=False)


def start_recipe(nodes: Nodes, tiny_model_dir: Path, make_image) -> dict[str, str]:
    """Keys, node A, node B as the recipe writes them (CPU edits only); picture.png for the
    client. Returns the edited steps."""
    steps = recipe_steps()
    assert set(RUN_STEPS) <= set(steps), steps.keys()
    joined = "\n".join(steps[s] for s in RUN_STEPS)
    for old in FOR_CPU:
        assert old in joined, f"the recipe no longer has {old!r}: update FOR_CPU"
    models = nodes.workdir / "models"
    served = steps["node-b"].split("--model ")[1].split()[0]  # /models/NAME
    assert served.startswith("/models/"), served
    shutil.copytree(tiny_model_dir, models / Path(served).name)  # the served name is NAME
    make_image(96, 128, seed=3).save(nodes.workdir / "picture.png")
    edited = {s: for_cpu(steps[s], models) for s in RUN_STEPS}
    nodes.run(edited["keys"])
    nodes.start("node-a", nodes.a, edited["node-a"])
    nodes.start("node-b", nodes.b, edited["node-b"])
    nodes.wait_up()
    return edited


def run_client(nodes: Nodes, client: str) -> tuple[dict, dict]:
    """The client step, in the host namespace: (health, chat completion)."""
    docs = json_documents(nodes.run(client))
    assert len(docs) == 2, docs
    health, reply = docs
    assert [e["state"] for e in health["encoders"]] == ["up"], health
    assert reply.get("object") == "chat.completion", reply
    assert reply["usage"]["completion_tokens"] >= 1, reply
    return health, reply


def image_request(make_image, model: str, seed: int, size=(96, 128)) -> dict:
    from tests.faults.conftest import image_body

    return {**image_body(make_image, *size, seed=seed, max_tokens=2), "model": model}


def wait_all_free(nodes: Nodes, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, health = http(nodes.url + "/health", timeout=5)
        pool = health.get("pool", {})
        busy = pool.get("pending_requests", 1) or pool.get("waiting_requests", 1)
        if status == 200 and pool["available_blocks"] == pool["total_blocks"] and not busy:
            return pool
        assert time.monotonic() < deadline, health
        time.sleep(0.5)


@pytest.fixture
def nodes(tmp_path):
    n = Nodes(tmp_path)
    try:
        yield n
    finally:
        n.close()
        for name in ("node-a", "node-b"):
            print(f"----- {name} -----\n{n.log(name)}")  # shown when the test fails


def test_recipe_as_written_then_partition_heals(nodes, tiny_model_dir, make_image):
    edited = start_recipe(nodes, tiny_model_dir, make_image)
    health, reply = run_client(nodes, edited["client"])
    model = reply["model"]
    assert model == "Qwen3-VL-30B-A3B-Instruct"
    assert reply["epd"]["timings"]["transfer_s"] > 0  # rows crossed the fabric link, over TCP
    pool = wait_all_free(nodes, timeout=10)
    assert pool["peak_used_blocks"] >= 1, pool

    # Partition: the request fails clearly (no hang); the encoder is marked down; no leak.
    nodes.link(up=False)
    cut, body = http(nodes.url + "/v1/chat/completions", image_request(make_image, model, 30), 90)
    assert cut in (503, 504), body
    status, body = http(nodes.url + "/v1/chat/completions", image_request(make_image, model, 31))
    assert status == 503 and "no encode server" in body["error"]["message"], body
    # Heal: the encoder is seen again and serves; the cut request's blocks come back once the
    # transport's own timeout has passed since its writer was declared dead (--dead-writer-wait).
    nodes.link(up=True)
    deadline = time.monotonic() + 60
    while (status := http(nodes.url + "/v1/chat/completions",
                          image_request(make_image, model, 40), 30)[0]) != 200:  # fmt: skip
        assert time.monotonic() < deadline, status
        time.sleep(1.0)
    run_client(nodes, edited["client"])
    pool = wait_all_free(nodes, timeout=60)
    print(f"partition: cut request {cut}, healed; pool after {pool}")


def test_recipe_on_a_capped_lossy_link(nodes, tiny_model_dir, make_image):
    nodes.degrade(loss=0.05, rate="2mbit")  # before anything starts: the handshakes cross it too
    edited = start_recipe(nodes, tiny_model_dir, make_image)
    _, reply = run_client(nodes, edited["client"])
    model = reply["model"]
    statuses = [
        http(nodes.url + "/v1/chat/completions", image_request(make_image, model, i), 90)[0]
        for i in range(6)
    ]
    assert statuses == [200] * 6, statuses
    # A 448x448 image is 196 visual tokens x 1 KiB (float32, H=64): at least 0.8 s at 2 Mbit/s.
    status, big = http(nodes.url + "/v1/chat/completions",
                       image_request(make_image, model, 20, (448, 448)), 90)  # fmt: skip
    assert status == 200, big
    capped_s = big["epd"]["timings"]["transfer_s"]
    assert capped_s > 0.4, f"the cap did not slow the transfer ({capped_s:.3f} s)"
    pool = wait_all_free(nodes, timeout=20)
    print(f"capped lossy link: statuses {statuses}; 196-token transfer {capped_s:.2f} s; {pool}")
