"""Start encode and language servers as real local processes, wait for them, stop them.

Used by ``epd-demo``, the end-to-end tests and the end-to-end benchmark. Every process runs the
same console scripts a user runs (``epd-encode``, ``epd-language``) with loopback addresses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def script(name: str) -> list[str]:
    """The console script ``name`` from this interpreter's environment."""
    path = Path(sys.executable).with_name(name)
    if path.exists():
        return [str(path)]
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed; run scripts/setup.sh")
    return [found]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict, timeout: float = 120.0) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@dataclass
class LocalCluster:
    """``n_encoders`` encode servers and one language server on loopback.

    Use as a context manager; ``url`` is the language server's base URL. Logs go to
    ``log_dir`` (one file per process).
    """

    model: Path
    n_encoders: int = 1
    transport: str = "mooncake"
    log_dir: Path = Path("out/logs")
    language_args: list[str] = field(default_factory=list)
    encoder_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 120.0
    torch_threads: int = 1  # several servers share this host: one intra-op thread each
    media_dir: Path | None = None  # image paths the language server may read (None: none)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    encoder_ports: list[int] = field(default_factory=list)
    http_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(self.n_encoders):
                self.start_encoder(i)
            self.start_language()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def start_language(self) -> None:
        """Start the language server (again, on its old port, when restarting)."""
        self.http_port = self.http_port or free_port()
        cmd = script("epd-language") + [
            "--model", str(self.model), "--port", str(self.http_port),
            "--transport", self.transport, "--torch-threads", str(self.torch_threads),
            *self.language_args,
        ]  # fmt: skip
        if self.media_dir is not None:
            cmd += ["--allowed-local-media-path", str(self.media_dir)]
        for port in self.encoder_ports:
            cmd += ["--encoder", f"tcp://127.0.0.1:{port}"]
        self._spawn("language", cmd)

    def start_encoder(self, i: int, port: int | None = None) -> None:
        """Start encoder ``i`` (again, on its old port, when restarting)."""
        if port is None:
            port = self.encoder_ports[i] if i < len(self.encoder_ports) else free_port()
        if i >= len(self.encoder_ports):
            self.encoder_ports.append(port)
        cmd = script("epd-encode") + [
            "--model", str(self.model), "--port", str(port), "--transport", self.transport,
            "--encoder-id", f"encoder-{i}", "--torch-threads", str(self.torch_threads),
            *self.encoder_args,
        ]  # fmt: skip
        self._spawn(f"encoder-{i}", cmd)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MC_LOG_LEVEL": "ERROR"}
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def wait_ready(self) -> dict:
        """Block until /health answers with every encoder up; returns that /health."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_dir}")
            try:
                health = get_json(self.url + "/health", timeout=2)
                if all(e["state"] == "up" for e in health["encoders"]):
                    return health
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"cluster not ready in {self.startup_timeout_s} s; see {self.log_dir}")

    def chat(self, body: dict, timeout: float = 120.0) -> tuple[int, dict]:
        return post_json(self.url + "/v1/chat/completions", body, timeout)

    def health(self) -> dict:
        return get_json(self.url + "/health")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM every process (language first), SIGKILL what is left after 15 s."""
        for name in sorted(self.procs, key=lambda n: n != "language"):
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
