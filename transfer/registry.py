"""Transport backends by name. Modules load on first use, so RDMA code stays unloaded unless
``mooncake`` is asked for."""

from __future__ import annotations

import importlib
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
