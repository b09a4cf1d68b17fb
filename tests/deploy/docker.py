"""A private Docker daemon for the tests, and the project's image built without a registry.

``Dockerd.start()`` runs ``dockerd`` with its own data root, exec root, socket and pid file
under one temporary directory and no default bridge; ``stop()`` ends it, deletes that directory
and puts back what Docker's standard networking changed on the host: the iptables rules (saved
before it started) and ``net.ipv4.ip_forward``. Standard networking (NAT) because the embedded
DNS of a compose network must reach the host's resolver: without it, looking up a stopped
container's name takes 10 s, which a real user's Docker answers at once. Storage driver:
overlay2 where the kernel offers it, else vfs (it copies the whole file system for every layer
and for every container, twice: about 13 GB per container of this image);
``EPD_DOCKER_STORAGE_DRIVER`` forces one.

``build_image()`` needs no registry: a Debian bookworm base made by scripts/docker_base.sh
(debootstrap) and ``docker import``, and every Python package from a wheel directory made by
scripts/docker_wheels.sh, served to the build over HTTP on loopback. Both are kept in
``EPD_DOCKER_CACHE`` (default ``~/.cache/epd-docker``, outside the daemon's data root), keyed by
what they are made from, so only the first run pays for debootstrap and the wheel download.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
DOCKER = "/usr/bin/docker"  # Debian's docker.io client; another `docker` on PATH may not be it
DOCKERD = "/usr/sbin/dockerd"
CACHE = Path(os.environ.get("EPD_DOCKER_CACHE") or Path.home() / ".cache" / "epd-docker")
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
PRIVILEGE_ERRORS = ("operation not permitted", "permission denied", "must be run as root")


class DockerdUnavailable(Exception):
    """dockerd cannot start here for lack of privileges (the caller skips, saying why)."""


@dataclass
class Dockerd:
    root: Path
    driver: str
    proc: subprocess.Popen | None = None
    timings: dict[str, float] = field(default_factory=dict)
    host_net: HostNetwork | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.root}/docker.sock"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "1"}

    @classmethod
    def start(cls, drivers: Sequence[str] | None = None) -> Dockerd:
        """Start a private daemon (the first of ``drivers`` that works); raise
        DockerdUnavailable without privileges, AssertionError on any other failure."""
        if os.geteuid() != 0:
            raise DockerdUnavailable("dockerd needs root (no privileges here)")
        for exe in (DOCKER, DOCKERD, shutil.which("docker-compose") or "docker-compose"):
            assert Path(exe).exists(), f"{exe} is missing: run scripts/setup.sh (docker.io)"
        forced = os.environ.get("EPD_DOCKER_STORAGE_DRIVER")
        errors = []
        for driver in drivers or ([forced] if forced else ["overlay2", "vfs"]):
            daemon = cls(Path(tempfile.mkdtemp(prefix="epd-dockerd-", dir="/tmp")), driver)
            try:
                daemon._launch()
                return daemon
            except AssertionError as e:
                daemon.stop()
                errors.append(f"--storage-driver {driver}: {e}")
        text = "\n".join(errors)
        if any(p in text.lower() for p in PRIVILEGE_ERRORS):
            raise DockerdUnavailable(f"dockerd cannot start without privileges:\n{text}")
        raise AssertionError(f"dockerd did not start:\n{text}")

    def _launch(self, timeout: float = 60.0) -> None:
        r = self.root
        cmd = [DOCKERD, "--data-root", f"{r}/data", "--exec-root", f"{r}/exec", "-H", self.host,
               "--pidfile", f"{r}/docker.pid", "--storage-driver", self.driver,
               "--bridge", "none"]  # fmt: skip
        self.host_net = HostNetwork.save()
        with open(r / "dockerd.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.log_tail()}")
            if self.docker("version", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"no answer in {timeout} s: {self.log_tail()}")

    def log_tail(self, n: int = 15) -> str:
        path = self.root / "dockerd.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-n:])

    def docker(self, *args: str, check: bool = True, timeout: float = 600.0,
               log: Path | None = None, **kw) -> subprocess.CompletedProcess:  # fmt: skip
        """``docker ARGS`` against this daemon; output to ``log`` if given, else captured."""
        return _run([DOCKER, *args], self.env, check, timeout, log, **kw)

    def compose(self, project: str, files: Sequence[Path], env: dict[str, str], *args: str,
                check: bool = True, timeout: float = 600.0) -> subprocess.CompletedProcess:  # fmt: skip
        """``docker-compose -p PROJECT -f FILE... ARGS`` against this daemon, with ``env`` as
        the only compose variables (nothing from the caller's environment or a .env file)."""
        exe = shutil.which("docker-compose") or "docker-compose"
        files_args = [a for f in files for a in ("-f", str(f))]
        with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:
            cmd = [exe, "--env-file", empty.name, "-p", project, *files_args, *args]
            return _run(
                cmd, {**_without_compose_vars(self.env, files), **env}, check, timeout, None
            )

    def stop(self) -> None:
        """End the daemon (it stops its containers), then delete its directory."""
        bridges = []
        if self.proc is not None and self.proc.poll() is None:
            ids = self.docker("network", "ls", "-q", "--filter", "driver=bridge", check=False)
            bridges = [f"br-{i[:12]}" for i in ids.stdout.split()]
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for bridge in bridges:  # networks left behind (compose down removes its own)
            subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        if self.host_net is not None:
            self.host_net.restore()
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(f"{self.root}/")), reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class HostNetwork:
    """The host's iptables rules and ip_forward, as they were before dockerd changed them."""

    rules: str
    ip_forward: str

    @classmethod
    def save(cls) -> HostNetwork:
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True)
        return cls(rules.stdout, Path(IP_FORWARD).read_text())

    def restore(self) -> None:
        saved = set(re.findall(r"^\*(\w+)$", self.rules, re.M))
        for table in ("filter", "nat"):
            if table not in saved:  # created by dockerd: empty it
                subprocess.run(["iptables", "-t", table, "-F"], capture_output=True)
                subprocess.run(["iptables", "-t", table, "-X"], capture_output=True)
        subprocess.run(["iptables-restore"], input=self.rules, text=True, check=True)
        Path(IP_FORWARD).write_text(self.ip_forward)


def _run(cmd: list[str], env: dict[str, str], check: bool, timeout: float, log: Path | None,
         **kw) -> subprocess.CompletedProcess:  # fmt: skip
    if log is None:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
        output = proc.stdout + proc.stderr
    else:
        with open(log, "ab") as f:
            proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout, **kw)  # fmt: skip
        output = log.read_text(errors="replace")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-6000:]}")
    return proc


def _without_compose_vars(env: dict[str, str], files: Sequence[Path]) -> dict[str, str]:
    names = set(re.findall(r"\$\{(\w+)", "".join(f.read_text() for f in files)))
    return {k: v for k, v in env.items() if k not in names}


# --------------------------------------------------------------------- the image, no registry


def _digest(*parts: str | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.read_bytes() if isinstance(part, Path) else part.encode())
    return h.hexdigest()[:16]


def _cached(kind: str, key: str, suffix: str, make: list[str], log: Path) -> tuple[Path, bool]:
    """CACHE/KIND-KEY[SUFFIX], made by ``make + [path]`` when missing (older keys of the same
    kind are deleted); returns (path, whether it was already there)."""
    path = CACHE / f"{kind}-{key}{suffix}"
    if path.exists():
        return path, True
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.glob(f"{kind}-*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    _run([*make, str(path)], dict(os.environ), True, 1800, log, cwd=ROOT)
    return path, False


@contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """An HTTP server on loopback for ``directory`` (pip --find-links reads its listing)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def build_image(daemon: Dockerd, tag: str, log: Path) -> dict[str, float | bool]:
    """Build the Dockerfile as ``tag`` on ``daemon`` from the cached base and wheels (made first
    when missing). Returns the seconds each step took and whether the caches were warm."""
    times: dict[str, float | bool] = {}
    t0 = time.monotonic()
    base_script, wheels_script = SCRIPTS / "docker_base.sh", SCRIPTS / "docker_wheels.sh"
    base, times["base_cached"] = _cached("base-bookworm", _digest(base_script), ".tar",
                                         ["bash", str(base_script)], log)  # fmt: skip
    times["base_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    wheels_key = _digest(wheels_script, ROOT / "pyproject.toml", _torch_packages())
    wheels, times["wheels_cached"] = _cached("wheels", wheels_key, "", ["bash", str(wheels_script)],
                                             log)  # fmt: skip
    times["wheels_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    daemon.docker("import", str(base), "epd-base:bookworm", log=log)
    times["import_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    with serve_directory(wheels) as url:
        daemon.docker("build", "--progress=plain", "--network", "host",
                      "--build-arg", "BASE_IMAGE=epd-base:bookworm", "--build-arg", f"WHEELS={url}",
                      "-t", tag, str(ROOT), log=log, timeout=1800)  # fmt: skip
    times["build_s"] = time.monotonic() - t0
    return times


def _torch_packages() -> str:
    match = re.search(r'^ARG TORCH_PACKAGES="(.*)"$', (ROOT / "Dockerfile").read_text(), re.M)
    assert match, "the Dockerfile has no ARG TORCH_PACKAGES"
    return match.group(1)


def disk_use(path: Path) -> int:
    """Bytes under ``path`` on its own file system (du -sx; 0 when it is gone)."""
    proc = subprocess.run(["du", "-sxb", str(path)], capture_output=True, text=True)
    return int(proc.stdout.split()[0]) if proc.returncode == 0 else 0
