"""Generation engines, chosen by name: the one registry ``--engine`` reads.

Each engine is a subpackage that implements ``base.EngineBase`` (the contract ``ChatService``
drives) and is imported only when chosen, so the reference engine never loads SGLang:

- ``reference/``: ``--engine transformers``, our ``Qwen3MoeForCausalLMWithDeepStack`` on
  transformers' modules, its KV-cached generation loop; the receive pool lives in the front
  door's process.
- ``sglang/``: ``--engine sglang``, SGLang's ``Engine`` in process, with our model package for
  SGLang; the receive pool lives in SGLang's scheduler process, where the model runs.
- ``weights.py``: the checkpoint's language tensors, read by both.

Arrows: an engine imports ``base``, ``weights``, ``language_server.config`` and the pool's
``ReceivedPrompt`` (``language_server.pool.leases``); never the other engine, ``http``,
``encoders`` or ``prompt``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from language_server.config import LanguageConfig
    from language_server.engines.base import EngineBase


@dataclass(frozen=True)
class EngineEntry:
    """One engine: its ``--engine`` name, its builder (``"module:function"``, imported only
    when chosen) and whether it hosts the receive pool in its own processes (then the front door
    lends only the pool's layout and reaches its memory through a ``PoolHostLink``)."""

    name: str
    builder: str
    hosts_pool: bool
    help: str

    def build(self, config: LanguageConfig, pool_address: str = "") -> EngineBase:
        """The engine for ``config``, weights loaded; ``pool_address``: where an engine that
        hosts the pool announces it (empty: the pool stays in the front door's process)."""
        module, _, function = self.builder.partition(":")
        make: Callable[..., Any] = getattr(importlib.import_module(module), function)
        return make(config, pool_address)


ENGINES: dict[str, EngineEntry] = {
    e.name: e
    for e in (
        EngineEntry("transformers", "language_server.engines.reference.engine:build", False,
                    "the transformers reference"),
        EngineEntry("sglang", "language_server.engines.sglang.launch:build", True,
                    "SGLang in process"),
    )
}  # fmt: skip


def engine_entry(name: str) -> EngineEntry:
    """The registered engine called ``name`` (ValueError naming the choices otherwise)."""
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"--engine must be one of {tuple(ENGINES)}, got {name!r}") from None
