#!/usr/bin/env bash
# Idempotent CPU install of SGLang 0.5.23 into .venv, for `epd-language --engine sglang` and the
# tests in tests/sglang (SGLang's plain native mode on CPU; slow, for correctness only).
#
# sglang==0.5.23 pins torch==2.14.1 (what scripts/setup.sh installs) but also ~30 CUDA-only
# packages and transformers==5.19.0, so it goes in with --no-deps, followed by the pure-Python
# packages its import chain needs, each pinned and also --no-deps. torch, torchvision and
# transformers are never touched (checked at the end). SGLang's RotaryEmbedding imports
# `vllm._custom_ops.rotary_embedding` on a machine with neither CUDA nor SGLang's CPU kernels
# without calling it on the native path, so a stand-in module is written into the venv.
# GPU nodes install SGLang with its dependencies instead: see docs/sglang.md.
# A re-run that finds everything in place takes about a second (EPD_SGLANG_CHECK=1 also imports
# SGLang's engine, ~15 s).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
PIP="$PY -m pip"
SGLANG_VERSION=0.5.23

# Pure-Python (or CPU-wheel) packages that `import sglang.srt.entrypoints.engine`, the
# scheduler/detokenizer subprocesses and SGLang's HTTP server need here, with their own
# dependencies, all pinned.
DEPS=(
  apache-tvm-ffi==0.1.11 compressed-tensors==0.18.0 dill==0.4.1 einops==0.8.2 gguf==0.19.0
  ipython==9.18.1 ipython_pygments_lexers==1.1.1 asttokens==3.0.2 executing==2.3.0
  jedi==0.20.1 parso==0.8.7 pexpect==4.9.0 ptyprocess==0.7.0 prompt_toolkit==3.0.53
  pure_eval==0.2.4 stack-data==0.6.3 traitlets==5.16.1 matplotlib-inline==0.2.2 wcwidth==0.9.4
  loguru==0.7.3 orjson==3.13.0 partial-json-parser==0.2.1.1.post7 psutil==7.2.2
  pybase64==1.5.1 sentencepiece==0.2.1 setproctitle==1.3.8 uvloop==0.23.0 xgrammar==0.2.7
  # SGLang's own HTTP server (`python -m sglang.launch_server`, for epd-bench-peer); attrs, which
  # jsonschema and referencing also need, is already there (mooncake -> aiohttp -> attrs)
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  soundfile==0.13.1 cffi==2.1.1 pycparser==3.12 python-multipart==0.0.34
)

# Prints each NAME==VERSION argument whose installed version differs (or that is missing).
MISSING_PY='
import importlib.metadata as m, sys
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        ok = m.version(name) == want
    except m.PackageNotFoundError:
        ok = False
    if not ok:
        print(spec)
'
missing_specs() { "$PY" -c "$MISSING_PY" "$@"; }
versions() {
  "$PY" -c 'import importlib.metadata as m; print(*(m.version(p) for p in ("torch", "torchvision", "transformers")))'
}

before=$(versions)
changed=0

if [ -n "$(missing_specs "sglang==$SGLANG_VERSION")" ]; then
  echo "[setup-sglang] installing sglang==$SGLANG_VERSION (--no-deps)"
  $PIP install -q --no-deps "sglang==$SGLANG_VERSION"
  changed=1
fi

mapfile -t missing < <(missing_specs "${DEPS[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup-sglang] installing ${#missing[@]} packages SGLang imports (--no-deps)"
  $PIP install -q --no-deps "${missing[@]}"
  changed=1
fi

site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -f "$site/vllm/_custom_ops.py" ]; then
  echo "[setup-sglang] writing the vllm._custom_ops stand-in"
  mkdir -p "$site/vllm"
  cat >"$site/vllm/__init__.py" <<'PYEOF'
"""Stand-in written by scripts/setup_sglang.sh: NOT vLLM. Only `vllm._custom_ops` exists, so that
SGLang's RotaryEmbedding can be built on a CPU machine without CUDA (it imports, never calls it)."""
PYEOF
  cat >"$site/vllm/_custom_ops.py" <<'PYEOF'
"""Stand-in for vllm._custom_ops (written by scripts/setup_sglang.sh; not vLLM)."""


def rotary_embedding(*args, **kwargs):
    raise NotImplementedError(
        "vllm._custom_ops is a stand-in written by scripts/setup_sglang.sh; SGLang should take "
        "its native rotary path on CPU. Install the real vLLM or SGLang's kernels for this path."
    )
PYEOF
  changed=1
fi

after=$(versions)
if [ "$before" != "$after" ]; then
  echo "[setup-sglang] torch/torchvision/transformers changed: '$before' -> '$after'" >&2
  exit 1
fi
if [ "$changed" = 1 ] || [ "${EPD_SGLANG_CHECK:-0}" = 1 ]; then
  "$PY" -W ignore -c 'import sglang.srt.entrypoints.engine, sglang.srt.models.qwen3_vl_moe' \
    || { echo "[setup-sglang] sglang does not import; see the error above" >&2; exit 1; }
fi
echo "[setup-sglang] sglang $SGLANG_VERSION ready (torch, torchvision, transformers: $after)"
