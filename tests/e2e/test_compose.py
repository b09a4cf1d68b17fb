"""The compose cluster: docker-compose.yml (and the shm override) validate, and the commands they
hold run, unchanged, as local processes on loopback and serve a request with an image.

There is no Docker engine here, only the `docker-compose` binary: `docker-compose config` checks
and normalises the files (interpolating variables), then each service's command runs as a plain
process with the variables pointing at loopback, free ports and a temporary model directory.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml  # PyYAML, a dependency of transformers

from epd.cluster import free_port, get_json, post_json, script

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "docker-compose.yml"
SHM = ROOT / "deploy" / "compose.shm.yml"
VARIANTS = {"mooncake": (BASE,), "shm": (BASE, SHM)}
SERVERS = ("encode-0", "encode-1", "language")
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MC_LOG_LEVEL": "ERROR"}
N_TOKENS = 4


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


# ------------------------------------------------------- the same commands as local processes


def _png_data_url(height: int, width: int, seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _start_order(services: dict) -> list[str]:
    """Service names with every service after those it depends on (as compose starts them)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...] = ()) -> None:
        assert name not in path, f"dependency cycle {path + (name,)}"
        if name not in order:
            for dep in services[name].get("depends_on", {}):
                visit(dep, path + (name,))
            order.append(name)

    for name in sorted(services):
        visit(name)
    return order


class Processes:
    """The services' commands as local processes, logging to ``log_dir``; ``stop`` ends them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self, service: dict) -> dict[str, str]:
        env = service.get("environment") or {}
        if isinstance(env, list):  # ["KEY=value", ...]
            env = dict(item.split("=", 1) for item in env)
        return {**os.environ, **{k: str(v) for k, v in env.items()}, **CHILD_ENV}

    def argv(self, service: dict) -> list[str]:
        cmd = command(service)
        return script(cmd[0]) + cmd[1:]

    def run_once(self, name: str, service: dict, timeout: float = 120.0) -> None:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            rc = subprocess.run(
                self.argv(service), env=self.env(service), stdout=log, stderr=subprocess.STDOUT,
                timeout=timeout,
            ).returncode  # fmt: skip
        assert rc == 0, f"{name} exited with {rc}"

    def start(self, name: str, service: dict) -> None:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                self.argv(service), env=self.env(service), stdout=log, stderr=subprocess.STDOUT
            )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}")

    def stop(self) -> dict[str, int]:
        """SIGTERM (language first), SIGKILL after 15 s; returns each exit code."""
        for name in sorted(self.procs, key=lambda n: n != "language"):
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes

    def print_logs(self) -> None:
        for log in sorted(self.log_dir.glob("*.log")):
            print(f"----- {log.name} -----\n{log.read_text(errors='replace')[-8000:]}")


@pytest.fixture
def processes(tmp_path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        codes = procs.stop()
        print("exit codes:", codes)
        procs.print_logs()  # pytest shows captured output only for failing tests


def _wait_ready(procs: Processes, url: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    health: dict = {}
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            health = get_json(url + "/health", timeout=2)
            encoders = health["encoders"]
            if len(encoders) == 2 and all(e["state"] == "up" for e in encoders):
                return health
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready in {timeout} s; last /health: {health}")


def _one_shot(services: dict) -> set[str]:
    """Services that others wait for to complete (the `model` service)."""
    return {
        dep
        for svc in services.values()
        for dep, cond in svc.get("depends_on", {}).items()
        if cond.get("condition") == "service_completed_successfully"
    }


@pytest.fixture(scope="module")
def compose_model(tmp_path_factory) -> tuple[Path, list[str]]:
    """The `model` service's command, run once into a temporary MODEL_DIR: (dir, command)."""
    root = tmp_path_factory.mktemp("compose-models")
    model_dir = root / "tiny"
    services = compose_config(VARIANTS["mooncake"], MODEL_DIR=str(model_dir))["services"]
    procs = Processes(root)
    try:
        procs.run_once("model", services["model"])
    except BaseException:
        procs.print_logs()
        raise
    assert (model_dir / "config.json").is_file()
    return model_dir, command(services["model"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compose_commands_run_locally(variant, compose_model, processes):
    model_dir, model_command = compose_model
    ports = {name: str(free_port()) for name in ("ENCODE0_PORT", "ENCODE1_PORT", "LANGUAGE_PORT")}
    env = {
        "ENCODE0_HOST": "127.0.0.1", "ENCODE1_HOST": "127.0.0.1", "LANGUAGE_HOST": "127.0.0.1",
        "BIND_HOST": "127.0.0.1", "MODEL_DIR": str(model_dir), "NUM_BLOCKS": "32", **ports,
    }  # fmt: skip
    services = compose_config(VARIANTS[variant], **env)["services"]
    order = _start_order(services)
    assert order[0] == "model" and set(order) == {"model", *SERVERS}
    assert _one_shot(services) == {"model"}

    for name in order:
        if name == "model":  # already run (same command) by the compose_model fixture
            assert command(services[name]) == model_command
        else:
            processes.start(name, services[name])
    assert flag(command(services["language"]), "--transport") == [variant]

    url = f"http://127.0.0.1:{ports['LANGUAGE_PORT']}"
    health = _wait_ready(processes, url)
    assert {e["id"] for e in health["encoders"]} == {"encode-0", "encode-1"}
    total = health["pool"]["total_blocks"]
    assert total == 32

    content = [
        {"type": "image_url", "image_url": {"url": _png_data_url(80, 112, seed=1)}},
        {"type": "text", "text": "What is in the picture?"},
    ]
    body = {"messages": [{"role": "user", "content": content}],
            "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}  # fmt: skip
    status, reply = post_json(url + "/v1/chat/completions", body, timeout=120)
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == N_TOKENS
    assert reply["choices"][0]["finish_reason"] == "length"

    pool = get_json(url + "/health")["pool"]
    assert pool["free_blocks"] == total, pool
    assert pool["peak_used_blocks"] >= 1, pool  # the image went through the receive pool
    processes.check_alive()
