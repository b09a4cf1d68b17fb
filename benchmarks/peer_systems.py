"""``epd-bench-peer``, launching: the four systems' processes, started, checked and stopped.

SGLang's own servers (``SGLangSystem``: monolithic, or an encoder-only and a language-only one)
and ours (``OurSystem``, through ``epd.cluster.LocalCluster``), each stopped with its whole
process tree; the command line of every process is kept for the report. See ``peer.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# every process of every system: offline, quiet Mooncake, SGLang's ViT-output cache off (the
# encoder-only server and the language side both size theirs from it; 0 admits nothing)
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MC_LOG_LEVEL": "ERROR",
    "SGLANG_VLM_CACHE_SIZE_MB": "0",
}
MAX_TOTAL_TOKENS = 65536  # SGLang's KV pool, as language_server's CPU defaults size it


def log(msg: str) -> None:
    print(f"[bench-peer] {msg}", file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_ports_free(ports: list[int], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while busy := [p for p in ports if not port_is_free(p)]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ports {busy} still in use {timeout_s:g} s after the stop")
        time.sleep(0.1)


def descendants(pids: list[int]) -> list[Any]:
    """The live processes ``pids`` and all their descendants (psutil.Process objects)."""
    import psutil

    out = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            out += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return out


def reap(procs: list[Any], timeout_s: float = 15.0) -> None:
    """SIGKILL whatever of ``procs`` outlived the stop and wait for it."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)


def cpu_seconds(procs: list[Any]) -> float:
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(f"    {line}" for line in text[-lines:]) or "    (empty)"


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# --- systems --------------------------------------------------------------------------------


class StartError(RuntimeError):
    """A system did not come up; the message carries the tail of its logs."""


@dataclass
class SGLangSystem:
    """SGLang's own HTTP servers (one, or an encoder-only and a language-only one).

    Each server runs in its own session, so that stopping it reaches its scheduler and
    detokenizer children too. ``start`` blocks until every server's /health answers 200 (SGLang
    answers 503 until its own warm-up request is done).
    """

    name: str
    model: Path
    seed: int
    log_dir: Path
    startup_timeout_s: float
    split_backend: str = "zmq_to_scheduler"
    split_language_sleeps: bool = False
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)

    def common_flags(self) -> list[str]:
        return [
            "--model-path", str(self.model), "--host", "127.0.0.1", "--device", "cpu",
            "--dtype", "float32", "--attention-backend", "torch_native",
            "--disable-radix-cache", "--mm-preprocess-cache-size-mb", "0",
            "--random-seed", str(self.seed), "--max-total-tokens", str(MAX_TOTAL_TOKENS),
        ]  # fmt: skip

    @property
    def roles(self) -> tuple[str, ...]:
        return ("server",) if self.name == "sglang-mono" else ("encoder", "language")

    def role_flags(self, role: str) -> list[str]:
        if role == "server":
            return ["--sleep-on-idle"]
        backend = ["--encoder-transfer-backend", self.split_backend]
        if role == "encoder":
            return ["--encoder-only", "--sleep-on-idle", *backend]
        sleep = ["--sleep-on-idle"] if self.split_language_sleeps else []
        return ["--language-only", *sleep, *backend,
                "--encoder-urls", f"http://127.0.0.1:{self.ports['encoder']}",
                # the language side's encoder bootstrap server (SGLang's default: 8997)
                "--encoder-bootstrap-port", str(self.ports["bootstrap"])]  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports[self.roles[-1]]}"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        needs = [*self.roles, "bootstrap"] if "language" in self.roles else self.roles
        self.ports.update({role: free_port() for role in needs})
        for role in self.roles:
            cmd = [sys.executable, "-m", "sglang.launch_server", *self.common_flags(),
                   "--port", str(self.ports[role]), *self.role_flags(role)]  # fmt: skip
            self.commands[role] = cmd
            with open(self.log_dir / f"{role}.log", "ab") as out:
                self.procs[role] = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, **ENV},
                )  # fmt: skip
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending = list(self.procs)
        while pending:
            for role, proc in self.procs.items():
                if proc.poll() is not None:
                    raise StartError(self.failure(f"{role} exited with {proc.returncode}"))
            pending = [
                r for r in pending if not http_ok(f"http://127.0.0.1:{self.ports[r]}/health")
            ]
            if pending and time.monotonic() > deadline:
                raise StartError(
                    self.failure(f"{pending} not ready in {self.startup_timeout_s:g} s")
                )
            if pending:
                time.sleep(0.25)

    def failure(self, what: str) -> str:
        tails = [f"  {role}.log:\n{log_tail(self.log_dir / f'{role}.log')}" for role in self.procs]
        return f"{self.name}: {what}; logs in {self.log_dir}\n" + "\n".join(tails)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def stop(self) -> None:
        tree = descendants(self.pids())
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reap(tree)
        wait_ports_free([p for p in self.ports.values() if p])


@dataclass
class OurSystem:
    """Our split through epd.cluster.LocalCluster: one encoder, one language server, Mooncake."""

    name: str
    model: Path
    seed: int
    log_dir: Path
    startup_timeout_s: float
    torch_threads: int = 1
    cluster: Any = None

    def language_args(self) -> list[str]:
        if self.name == "ours-ref":
            return ["--engine", "transformers", "--dtype", "float32"]
        sglang = {"attention_backend": "torch_native", "sleep_on_idle": True,
                  "disable_radix_cache": True, "mm_preprocess_cache_size_mb": 0,
                  "random_seed": self.seed, "max_total_tokens": MAX_TOTAL_TOKENS}  # fmt: skip
        return ["--engine", "sglang", "--dtype", "float32", "--sglang-args", json.dumps(sglang)]

    @property
    def url(self) -> str:
        return self.cluster.url

    @property
    def commands(self) -> dict[str, list[str]]:
        procs = self.cluster.procs if self.cluster else {}
        return {role: list(map(str, p.args)) for role, p in procs.items()}

    def start(self) -> None:
        from epd.cluster import LocalCluster

        self.cluster = LocalCluster(
            self.model, n_encoders=1, transport="mooncake", log_dir=self.log_dir,
            language_args=self.language_args(), encoder_args=["--dtype", "float32"],
            startup_timeout_s=self.startup_timeout_s, torch_threads=self.torch_threads,
        )  # fmt: skip
        try:
            self.cluster.start()  # stops what it started when it fails
        except (RuntimeError, TimeoutError) as exc:
            tails = [f"  {p.name}:\n{log_tail(p)}" for p in sorted(self.log_dir.glob("*.log"))]
            raise StartError(f"{self.name}: {exc}\n" + "\n".join(tails)) from None

    def pids(self) -> list[int]:
        return [p.pid for p in self.cluster.procs.values()] if self.cluster else []

    def stop(self) -> None:
        if self.cluster is None:
            return
        tree = descendants(self.pids())  # --engine sglang: SGLang's scheduler and detokenizer
        self.cluster.stop()
        reap(tree)
        wait_ports_free([self.cluster.http_port, *self.cluster.encoder_ports])


def make_system(name: str, args: argparse.Namespace, log_dir: Path) -> Any:
    common = dict(model=args.model, seed=args.seed, log_dir=log_dir,
                  startup_timeout_s=args.startup_timeout)  # fmt: skip
    if name.startswith("sglang-"):
        sleeps = args.split_sleep_on_idle == "on" or (
            args.split_sleep_on_idle == "auto" and args.split_backend != "zmq_to_scheduler"
        )
        return SGLangSystem(name, **common, split_backend=args.split_backend,
                            split_language_sleeps=sleeps)  # fmt: skip
    return OurSystem(name, **common, torch_threads=args.torch_threads)
