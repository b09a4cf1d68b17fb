"""Transport backends by name. Modules load on first use, so RDMA code stays unloaded unless
``mooncake`` is asked for."""

from __future__ import annotations

import argparse
import importlib
import socket
from typing import Any

from transfer.base import TransferReceiver, TransferSender

BACKENDS: dict[str, str] = {"mooncake": "transfer.mooncake", "shm": "transfer.shm"}


def _module(name: str) -> Any:
    if name not in BACKENDS:
        raise ValueError(f"unknown transfer backend {name!r}; choose one of {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def make_receiver(name: str, **options: Any) -> TransferReceiver:
    """Language-side endpoint of backend ``name`` (options go to its constructor)."""
    return _module(name).Receiver(**options)


def make_sender(name: str, **options: Any) -> TransferSender:
    """Encode-side endpoint of backend ``name`` (options go to its constructor)."""
    return _module(name).Sender(**options)


def write_timeout_s(name: str) -> float:
    """How long after its writer was declared dead a write of backend ``name`` may still land
    (the transport's own timeout); lent blocks wait this long (transfer/base.py, rule 2c)."""
    return float(_module(name).WRITE_TIMEOUT_S)


def advertised_host(bind_host: str, advertise_host: str = "") -> str:
    """The address peers reach this host at: ``advertise_host``, else the bind address (the
    hostname when bound to every interface)."""
    if advertise_host:
        return advertise_host
    return socket.gethostname() if bind_host in ("0.0.0.0", "::", "*") else bind_host


def endpoint_options(name: str, hostname: str, protocol: str, device_name: str) -> dict[str, Any]:
    """Constructor options of backend ``name``'s sender or receiver from the servers' flags."""
    if name == "mooncake":
        return {"hostname": hostname, "protocol": protocol, "device_name": device_name}
    return {}


def add_transport_flags(parser: argparse.ArgumentParser, peers: str) -> None:
    """The data-plane flags both servers take: --transport, --mooncake-protocol,
    --mooncake-device and --advertise-host (``peers``: who connects to this host)."""
    parser.add_argument("--transport", default="mooncake", choices=sorted(BACKENDS),
                        help="data plane: mooncake (RDMA/TCP) or shm (same host)")  # fmt: skip
    parser.add_argument("--mooncake-protocol", default="tcp", choices=["tcp", "rdma"],
                        help="Mooncake protocol (rdma on GPU nodes with RDMA NICs)")  # fmt: skip
    parser.add_argument("--mooncake-device", default="",
                        help="RDMA device names, e.g. mlx5_0,mlx5_1")  # fmt: skip
    parser.add_argument("--advertise-host", default="",
                        help=f"address {peers} reach this host at (default: --host)")  # fmt: skip
