"""The compose cluster: docker-compose.yml (and the shm override) validate, and `docker-compose
up` runs them for real in a private Docker daemon.

The Docker test starts its own dockerd (tests/deploy/docker.py: private data root, socket and pid
file; stopped and deleted at the end), builds the project's image from the Dockerfile with no
registry (a debootstrapped Debian bookworm base, the wheels from a local cache), then for each
variant runs `docker-compose up -d` (one language server, two encoders, Mooncake over TCP between
the containers, or shared memory with the override), sends a chat request with an image to the
published port, checks /health (every block free, both encoders up), /metrics and the container
healthcheck, stops one encoder container and checks that requests still succeed, then runs
`docker-compose down -v`. It skips, saying why, only where dockerd cannot start (no privileges).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml  # PyYAML, a dependency of transformers

from epd.cluster import free_port
from tests.deploy.docker import Dockerd, DockerdUnavailable, build_image, disk_use

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "docker-compose.yml"
SHM = ROOT / "deploy" / "compose.shm.yml"
VARIANTS = {"mooncake": (BASE,), "shm": (BASE, SHM)}
SERVERS = ("encode-0", "encode-1", "language")
N_TOKENS = 4
VFS_NEEDS = 70 << 30  # bytes a vfs data root takes: the image and one variant's 4 containers
SERVED_MODEL = "tiny"  # the name of the compose file's MODEL_DIR, /models/tiny


def _compose_vars() -> set[str]:
    """Every variable the compose files interpolate (so the caller's environment cannot leak in)."""
    text = "".join(p.read_text() for p in (BASE, SHM))
    return set(re.findall(r"\$\{(\w+)", text))


def compose_config(files: tuple[Path, ...], **env: str) -> dict:
    """``docker-compose -f ... config`` with only ``env`` set among the files' variables."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/setup.sh installs it)")
    clean = {k: v for k, v in os.environ.items() if k not in _compose_vars()}
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:
        # An empty --env-file: a developer's .env must not change what the tests see either.
        cmd = [exe, "--env-file", empty.name, *(a for f in files for a in ("-f", str(f)))]
        proc = subprocess.run(
            [*cmd, "config"], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]


def flag(cmd: list[str], name: str) -> list[str]:
    """Every value of ``--name`` in ``cmd``."""
    return [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == name]


def _port(spec: str | dict) -> tuple[str, int, int]:
    """(host_ip, published, target) of a published port, short ("IP:P:T/tcp") or long form."""
    if isinstance(spec, dict):
        return spec.get("host_ip", ""), int(spec["published"]), int(spec["target"])
    *host, published, target = spec.split("/")[0].split(":")
    return ":".join(host), int(published), int(target)


# ------------------------------------------------------- the files, as docker-compose reads them


def test_compose_file_validates():
    config = compose_config(VARIANTS["mooncake"])
    services = config["services"]
    assert set(services) == {"model", *SERVERS}
    assert command(services["model"]) == ["epd-make-tiny-model", "/models/tiny"]

    images = {s["image"] for s in services.values()}
    assert len(images) == 1, images  # one image for every service, built from the Dockerfile
    for name, svc in services.items():
        assert svc["build"]["context"] == str(ROOT)
        assert any(v.startswith("models:/models") for v in svc["volumes"]), name
        if name != "model":
            assert svc["depends_on"]["model"] == {"condition": "service_completed_successfully"}
            assert svc["hostname"] == name
            assert svc["networks"]["default"]["aliases"] == [name]

    for i, port in enumerate(("7001", "7002")):
        enc = command(services[f"encode-{i}"])
        assert enc[0] == "epd-encode"
        assert flag(enc, "--model") == ["/models/tiny"]
        assert flag(enc, "--host") == ["0.0.0.0"]
        assert flag(enc, "--port") == [port]
        assert flag(enc, "--advertise-host") == [f"encode-{i}"]
        assert flag(enc, "--transport") == ["mooncake"]

    lang = command(services["language"])
    assert lang[0] == "epd-language"
    assert flag(lang, "--model") == ["/models/tiny"]
    assert flag(lang, "--host") == ["0.0.0.0"]
    assert flag(lang, "--port") == ["8000"]
    assert flag(lang, "--advertise-host") == ["language"]
    assert flag(lang, "--encoder") == ["tcp://encode-0:7001", "tcp://encode-1:7002"]
    assert flag(lang, "--transport") == ["mooncake"]
    assert [_port(p) for p in services["language"]["ports"]] == [("127.0.0.1", 8000, 8000)]
    health = services["language"]["healthcheck"]
    assert "http://127.0.0.1:8000/health" in " ".join(health["test"])


def test_shm_override_validates():
    base = compose_config(VARIANTS["mooncake"])["services"]
    services = compose_config(VARIANTS["shm"])["services"]
    assert set(services) == {"model", *SERVERS}
    assert services["language"]["ipc"] == "shareable"
    assert services["encode-0"]["ipc"] == services["encode-1"]["ipc"] == "service:language"
    assert command(services["model"]) == command(base["model"])
    for name in SERVERS:
        cmd = command(services[name])
        assert flag(cmd, "--transport") == ["shm"], name
        # The override repeats the base commands; they must differ in the transport only.
        assert [a for a in cmd if a != "shm"] == [a for a in command(base[name]) if a != "mooncake"]


def test_variables_change_what_a_local_run_needs():
    env = {
        "ENCODE0_HOST": "e0.example", "ENCODE1_HOST": "e1.example", "LANGUAGE_HOST": "lm.example",
        "ENCODE0_PORT": "17001", "ENCODE1_PORT": "17002", "LANGUAGE_PORT": "18000",
        "BIND_HOST": "127.0.0.1", "MODEL_DIR": "/data/ckpt", "EPD_TRANSPORT": "shm",
    }  # fmt: skip
    services = compose_config(VARIANTS["mooncake"], **env)["services"]
    assert command(services["model"]) == ["epd-make-tiny-model", "/data/ckpt"]
    lang = command(services["language"])
    assert flag(lang, "--encoder") == ["tcp://e0.example:17001", "tcp://e1.example:17002"]
    assert flag(lang, "--advertise-host") == ["lm.example"]
    assert flag(lang, "--port") == ["18000"]
    for name in SERVERS:
        cmd = command(services[name])
        assert flag(cmd, "--model") == ["/data/ckpt"]
        assert flag(cmd, "--host") == ["127.0.0.1"]
        assert flag(cmd, "--transport") == ["shm"]
    assert flag(command(services["encode-1"]), "--port") == ["17002"]


def test_compose_file_names_the_image_and_a_publish_port_the_test_can_move():
    services = compose_config(
        VARIANTS["mooncake"], EPD_IMAGE="epd-qwen3vl:t", LANGUAGE_PUBLISH_PORT="18123"
    )["services"]
    assert {s["image"] for s in services.values()} == {"epd-qwen3vl:t"}
    assert [_port(p) for p in services["language"]["ports"]] == [("127.0.0.1", 18123, 8000)]


# ------------------------------------------------------- docker-compose up, in a private dockerd


def _png_data_url(height: int, width: int, seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _http(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, str]:
    """(status, body text); no proxy from the environment; status 0 when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, repr(e)


def _chat(url: str, seed: int) -> tuple[int, dict]:
    content = [
        {"type": "image_url", "image_url": {"url": _png_data_url(80, 112, seed=seed)}},
        {"type": "text", "text": "What is in the picture?"},
    ]
    body = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}  # fmt: skip
    status, text = _http(url + "/v1/chat/completions", body, timeout=120)
    return status, json.loads(text) if text.startswith("{") else {"raw": text}


def _health(url: str) -> dict:
    status, text = _http(url + "/health", timeout=5)
    return json.loads(text) if status == 200 else {}


def _wait(what: str, check, timeout: float, interval: float = 1.0):
    """Poll ``check()`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last})")


def _states(health: dict) -> dict[str, str]:
    return {e["id"]: e["state"] for e in health.get("encoders", [])}


def _metric(text: str, name: str, labels: str = "") -> float:
    """The value of ``name{labels}`` in a Prometheus text page (0 when absent)."""
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    try:
        daemon = Dockerd.start()
    except DockerdUnavailable as e:
        pytest.skip(str(e))
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def image(dockerd, tmp_path_factory) -> str:
    """The Dockerfile's image, built on the private daemon without a registry."""
    free = shutil.disk_usage(dockerd.root).free
    if dockerd.driver == "vfs" and free < VFS_NEEDS:  # measured: 13 GB image + 4 x 13 GB
        pytest.fail(f"the vfs storage driver needs about {VFS_NEEDS >> 30} GiB free under "
                    f"{dockerd.root}, {free >> 30} GiB are: free space or use overlay2")  # fmt: skip
    tag = f"epd-qwen3vl:test-{uuid.uuid4().hex[:8]}"
    log = tmp_path_factory.mktemp("docker") / "build.log"
    t0 = time.monotonic()
    times = build_image(dockerd, tag, log)
    data = disk_use(dockerd.root / "data")
    print(f"[compose] image {tag} ({dockerd.driver}) in {time.monotonic() - t0:.0f} s: "
          + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in times.items())
          + f"; data root {data / 2**30:.1f} GiB")  # fmt: skip
    dockerd.timings.update({k: v for k, v in times.items() if isinstance(v, float)})
    return tag


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.timeout(1800)  # the first one builds the image (about 3 minutes cold, more on vfs)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compose_up_in_docker(variant, dockerd, image):
    files = VARIANTS[variant]
    project = f"epd-{variant}-{uuid.uuid4().hex[:6]}"
    port = free_port()
    env = {"EPD_IMAGE": image, "LANGUAGE_PUBLISH_PORT": str(port)}
    url = f"http://127.0.0.1:{port}"
    times: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        dockerd.compose(project, files, env, "up", "-d", "--no-build", timeout=900)
        times["up"] = time.monotonic() - t0
        model_id = dockerd.compose(project, files, env, "ps", "-q", "model").stdout.strip()
        code = dockerd.docker("inspect", "-f", "{{.State.ExitCode}}", model_id).stdout.strip()
        assert code == "0", f"the model service exited {code}"
        health = _wait("both encoders up", lambda: (h := _health(url))
                       and _states(h) == {"encode-0": "up", "encode-1": "up"} and h, 240)  # fmt: skip
        times["ready"] = time.monotonic() - t0
        total = health["pool"]["total_blocks"]

        status, reply = _chat(url, seed=1)
        assert status == 200, reply
        assert reply["model"] == SERVED_MODEL
        assert reply["usage"]["completion_tokens"] == N_TOKENS
        assert reply["choices"][0]["finish_reason"] == "length"
        pool = _wait("every block free", lambda: (p := _health(url).get("pool"))
                     and p["available_blocks"] == total and p, 30)  # fmt: skip
        assert pool["peak_used_blocks"] >= 1, pool  # the image went through the receive pool

        status, metrics = _http(url + "/metrics")
        assert status == 200
        assert _metric(metrics, "epd_requests_total", 'status="200"') >= 1, metrics[-2000:]
        assert _metric(metrics, "epd_transfer_bytes_total") > 0, metrics[-2000:]
        lang_id = dockerd.compose(project, files, env, "ps", "-q", "language").stdout.strip()
        _wait("the language container's healthcheck", lambda: dockerd.docker(
            "inspect", "-f", "{{.State.Health.Status}}", lang_id).stdout.strip() == "healthy", 60)  # fmt: skip
        logs = dockerd.compose(project, files, env, "logs", "--no-color", "language").stdout
        assert f"transport {variant} session" in logs, logs[-3000:]

        # One encoder container stops: requests keep succeeding on the other.
        dockerd.compose(project, files, env, "stop", "encode-0", timeout=120)
        statuses = [_chat(url, seed=10 + i)[0] for i in range(4)]
        assert statuses == [200] * 4, statuses
        health = _wait("encode-0 seen down", lambda: (h := _health(url))
                       and _states(h) == {"encode-0": "down", "encode-1": "up"} and h, 30)  # fmt: skip
        pool = _wait("every block free", lambda: (p := _health(url).get("pool"))
                     and p["available_blocks"] == total and p, 60)  # fmt: skip
        times["checks"] = time.monotonic() - t0 - times["ready"]
    finally:
        logs = dockerd.compose(project, files, env, "logs", "--no-color", "--tail", "60",
                               check=False).stdout  # fmt: skip
        print(f"----- docker-compose logs ({project}) -----\n{logs}")
        t0 = time.monotonic()
        dockerd.compose(project, files, env, "down", "-v", "--remove-orphans", check=False)
        times["down"] = time.monotonic() - t0
    label = f"label=com.docker.compose.project={project}"
    assert dockerd.docker("ps", "-aq", "--filter", label).stdout.strip() == ""
    assert dockerd.docker("volume", "ls", "-q", "--filter", label).stdout.strip() == ""
    print(f"[compose] {variant}: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
