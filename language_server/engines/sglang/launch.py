"""Start-up of ``--engine sglang``: SGLang's ``Engine`` arguments from ``LanguageConfig``, our
model package registered for its processes, and the registry's ``build``.

``SGLANG_EXTERNAL_MODEL_PACKAGE`` is set to ``language_server.engines.sglang.models`` before sglang is
imported, and the checkpoint's ``architectures`` are overridden through
``json_model_override_args`` (the checkpoint directory is never edited).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import threading
from typing import Any

from language_server.config import LanguageConfig
from language_server.engines.sglang.engine import SGLangEngine
from language_server.engines.sglang.models import ARCHITECTURE, EXTERNAL_PACKAGE

log = logging.getLogger("epd.language.sglang")

# The first name selects our class; the second keeps SGLang's Qwen3-VL multimodal processor and
# flags, which SGLang picks by architecture NAME (with the first alone startup fails with
# "No processor registered for architecture").
ARCHITECTURES = [ARCHITECTURE, "Qwen3VLMoeForConditionalGeneration"]
EXTRA_ARGS_ENV = "EPD_SGLANG_ARGS"  # JSON object of extra sglang ServerArgs, e.g. {"tp_size": 8}
# sleep_on_idle: an idle scheduler otherwise busy-spins a core (5.0 s of CPU per 5 s idle, 0.08 s
# with it); on a small host that starved a co-located encoder (a 17 ms ViT step took 489 ms).
CPU_DEFAULTS = {
    "attention_backend": "torch_native",
    "max_total_tokens": 65536,
    "sleep_on_idle": True,
}


def build(config: LanguageConfig, pool_address: str = "") -> SGLangEngine:
    """Start SGLang's engine for ``config.model`` with ``--sglang-args`` (blocks until the model is
    loaded); with ``pool_address`` its scheduler process hosts the receive pool and announces it
    there (``pool_spec``).

    Called on the main thread (the server's start-up), it also handles SIGQUIT, which SGLang's
    watchdog sends this process when one of its children dies: the server logs it, kills
    SGLang's remaining processes and exits with status 70 instead of dumping core.
    """
    try:
        extra = json.loads(config.sglang_args or "{}")
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--sglang-args is not JSON: {exc}") from None
    pool = pool_spec(config, pool_address) if pool_address else None
    engine = SGLangEngine(lambda: start_sglang(config, pool, **extra))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGQUIT, engine.on_child_death)
    return engine


def pool_spec(config: LanguageConfig, address: str) -> dict[str, Any]:
    """What SGLang's scheduler process needs to host the receive pool (plain JSON values):
    the front door's channel ``address``, the transport and its options, sizes, dtype."""
    return {"address": address, "transport": config.transport,
            "options": config.receiver_options(), "num_blocks": config.num_blocks,
            "block_tokens": config.block_tokens, "dtype": config.dtype}  # fmt: skip


def engine_args(
    config: LanguageConfig, pool: dict[str, Any] | None = None, **overrides: Any
) -> dict[str, Any]:
    """Keyword arguments of ``sglang.Engine`` for ``config`` (+ EPD_SGLANG_ARGS, + overrides).

    ``pool`` (``pool_spec``) reaches our model's ``__init__`` in the scheduler process as
    ``config.epd_pool`` (SGLang sets every key of ``json_model_override_args`` on the config).
    """
    device, _, index = config.device.partition(":")
    model_overrides: dict[str, Any] = {"architectures": ARCHITECTURES}
    if pool is not None:
        model_overrides["epd_pool"] = pool
    if config.torch_threads > 0:  # else SGLang's scheduler takes one thread per core
        model_overrides["epd_torch_threads"] = config.torch_threads
    args: dict[str, Any] = {
        "model_path": str(config.model),
        "dtype": config.dtype,
        "device": device,
        "json_model_override_args": json.dumps(model_overrides),
        "log_level": config.log_level.lower(),
        # ids in, ids out, but keep SGLang's tokenizer: with skip_tokenizer_init its tokenizer
        # manager would pickle the tensor path's [n, 4H] rows inline to the scheduler (2+
        # copies) instead of one copy into shared memory.
        "skip_tokenizer_init": False,
        "random_seed": 0,
    }
    if device == "cpu":
        args.update(CPU_DEFAULTS, disable_cuda_graph=True)
    else:
        # A replayed prefill graph takes only input_embeds into its static buffer; whether the
        # DeepStack rows reach it is unchecked (docs/sglang.md): off until a GPU check says so.
        args["disable_prefill_cuda_graph"] = True
        if index:
            args["base_gpu_id"] = int(index)
    extra = os.environ.get(EXTRA_ARGS_ENV, "").strip()
    if extra:
        parsed = json.loads(extra)
        if not isinstance(parsed, dict):
            raise ValueError(f"{EXTRA_ARGS_ENV} must be a JSON object of sglang ServerArgs")
        args.update(parsed)
    args.update(overrides)
    return args


def start_sglang(config: LanguageConfig, pool: dict[str, Any] | None = None,
                 **overrides: Any) -> Any:  # fmt: skip
    """Register our model package, then start ``sglang.Engine`` (blocks ~20 s on CPU)."""
    current = os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE")
    if current not in (None, "", EXTERNAL_PACKAGE):
        raise RuntimeError(f"SGLANG_EXTERNAL_MODEL_PACKAGE is {current!r}; --engine sglang "
                           f"needs {EXTERNAL_PACKAGE!r}")  # fmt: skip
    os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = EXTERNAL_PACKAGE  # inherited by SGLang's children
    try:
        importlib.import_module(f"{EXTERNAL_PACKAGE}.qwen3_moe_deepstack")  # surface import errors
        from sglang.srt.entrypoints.engine import Engine
    except ImportError as exc:
        raise ImportError(
            f"--engine sglang needs SGLang 0.5.23 ({exc}); GPU nodes: pip install -e '.[sglang]' "
            "(see docs/sglang.md), CPU: bash scripts/setup_sglang.sh"
        ) from exc
    args = engine_args(config, pool, **overrides)
    if pool is not None:
        _check_pool_args(args)
    if args["device"] == "cpu" and int(args.get("tp_size", 1)) > 1:
        # TP on CPU: one OpenMP core set per rank (SGLang otherwise asks for a NUMA node per
        # rank), and no NCCL (a CUDA build of torch finds libnccl and SGLang then wants CUDA);
        # the ranks talk over gloo.
        cores = os.cpu_count() or 1
        per = max(1, cores // int(args["tp_size"]))
        binds = "|".join(f"{r * per}-{r * per + per - 1}" if per > 1 else str(r * per % cores)
                         for r in range(int(args["tp_size"])))  # fmt: skip
        os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", binds)
        os.environ.setdefault("SGLANG_NCCL_SO_PATH", "/nonexistent/libnccl.so.2")
    log.info("starting SGLang's engine: %s", {k: v for k, v in args.items() if k != "model_path"})
    return Engine(**args)


def _check_pool_args(args: dict[str, Any]) -> None:
    """Settings the pool in TP rank 0's scheduler process cannot serve: refuse them at start."""
    bad = []
    if int(args.get("dp_size", 1) or 1) > 1 or int(args.get("attn_dp_size", 1) or 1) > 1:
        bad.append("dp_size/attn_dp_size > 1 (one pool per replica; the front door knows one)")
    if args.get("enable_dp_attention"):
        bad.append("enable_dp_attention (ranks run different batches: the rows' broadcast "
                   "would not match)")  # fmt: skip
    if args.get("speculative_algorithm"):
        bad.append("speculative decoding")
    if bad:
        raise ValueError(
            "--engine sglang with the receive pool does not support: " + "; ".join(bad)
        )
