#!/usr/bin/env bash
# GPU-node check, for a machine with an NVIDIA GPU. NOT yet run on a GPU (none was lent while it
# was written): read, `bash -n`-checked, and run on a CPU machine with EPD_GPU_DEVICE=cpu, where
# install and parity pass and the rest stop at the missing driver (libcuda.so.1). From the
# repository root:
#
#   bash scripts/gpu_check.sh            # prints one summary line per check at the end
#
# 1. install  a separate venv ($GPU_VENV, default .venv-gpu) with torch 2.14.1 (PyPI's CUDA
#             build) and this project with Mooncake's CUDA build (`.[gpu]`, never beside the
#             CPU build); offline, point pip at local wheels: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR
# 2. cuda     torch sees the GPU, and Mooncake's CUDA build imports
# 3. parity   tests/deploy/test_gpu.py: the split halves against transformers' monolithic model,
#             bfloat16 on $EPD_GPU_DEVICE (default cuda:0), logits and greedy tokens
# 4. e2e      both servers as processes with --device $EPD_GPU_DEVICE --dtype bfloat16, two
#             encoders, requests with images (tests/deploy/test_gpu.py)
# 5. transfer Mooncake writes with the sources and the receive pool in GPU memory, rows checked
#             (EPD_GPU_MOONCAKE_PROTOCOL=rdma EPD_GPU_MOONCAKE_DEVICE=mlx5_0 for RDMA)
# 6. bench    epd-bench-transfer --quick (host memory), for comparison
# 7. suite    the CPU test suite's parity and end-to-end tests in the GPU venv (float32, CPU):
#             the CUDA builds change nothing there
#
# Logs: out/gpu-check/*.log. Exit status: the number of failed checks.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU_VENV=${GPU_VENV:-.venv-gpu}
PY="$GPU_VENV/bin/python"
LOGS=out/gpu-check
export EPD_GPU_DEVICE=${EPD_GPU_DEVICE:-cuda:0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MC_LOG_LEVEL=ERROR
mkdir -p "$LOGS"
summary=()
failed=0

# run NAME DETAIL_PATTERN CMD...: CMD's output to $LOGS/NAME.log; one summary line: PASS/FAIL,
# seconds, and the log lines that match DETAIL_PATTERN (else the last line).
run() {
  local name=$1 pattern=$2 start status detail
  shift 2
  start=$(date +%s)
  if "$@" >"$LOGS/$name.log" 2>&1; then status=PASS; else status=FAIL; failed=$((failed + 1)); fi
  detail=$(grep -E "$pattern" "$LOGS/$name.log" | head -n 4 | sed 's/^.*\[gpu\] //' | paste -sd ';' -)
  [ -n "$detail" ] || detail=$(tail -n 1 "$LOGS/$name.log")
  summary+=("$(printf '%-4s %-8s %4ss  %s' "$status" "$name" "$(($(date +%s) - start))" "$detail")")
  echo "[gpu_check] $name: $status"
}

install() {
  [ -x "$PY" ] || python3 -m venv "$GPU_VENV" || return 1
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 || return 1
  # The test tools of the `test` extra, without its CPU Mooncake build.
  mapfile -t tools < <("$PY" -c 'import tomllib; t = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(r for r in t["project"]["optional-dependencies"]["test"] if "mooncake" not in r))')
  "$PY" -m pip install -q -e ".[gpu]" "${tools[@]}" || return 1
  # Mooncake's CUDA build (0.3.13.post1) links libcudart.so.12, but torch 2.14.1 brings CUDA 13's
  # runtime: without a system CUDA 12, take it from pip (cuda12_libs puts it on the path). It
  # also links libmlx5.so.1 (Debian's ibverbs-providers) and the driver's libcuda.so.1.
  "$PY" -c 'import nvidia.cuda_runtime' 2>/dev/null || ldconfig -p | grep -q libcudart.so.12 \
    || "$PY" -m pip install -q nvidia-cuda-runtime-cu12 || return 1
  if ! ldconfig -p | grep -q libmlx5.so.1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ibverbs-providers
  fi
  "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|mooncake|nvidia-cuda-runtime)'
}

cuda12_libs() {  # the pip-installed CUDA 12 runtime, first on the library path
  local lib
  lib=$("$PY" -c 'import nvidia.cuda_runtime as m; print(m.__path__[0] + "/lib")' 2>/dev/null) \
    && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  return 0
}

cuda() {
  "$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
name = torch.cuda.get_device_name(0)
print(f"[gpu] torch {torch.__version__} (CUDA {torch.version.cuda}) on {name}, "
      f"{torch.cuda.device_count()} device(s)")
try:
    import mooncake.engine  # noqa: F401
except ImportError as e:  # libcudart.so.12, libmlx5.so.1, libcuda.so.1: see install()
    raise SystemExit(f"Mooncake's CUDA build does not import: {e}")
print("[gpu] mooncake (CUDA build) imports")
EOF
}

tests() {  # tests/deploy/test_gpu.py -k EXPR
  "$PY" -m pytest tests/deploy/test_gpu.py -q -s -p no:cacheprovider -k "$1"
}

run install 'torch|mooncake' install
cuda12_libs
run cuda '\[gpu\]' cuda
run parity '\[gpu\] parity' tests parity
run e2e '\[gpu\] e2e' tests end_to_end
run transfer '\[gpu\] transfer' tests mooncake_between
run bench 'mooncake / raw-mooncake' "$GPU_VENV/bin/epd-bench-transfer" --quick
run suite 'passed|failed' "$PY" -m pytest tests/parity tests/e2e/test_servers.py -q -x \
  -p no:cacheprovider

echo
echo "GPU check ($(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null \
  | head -n 1 || echo 'nvidia-smi not found')), logs in $LOGS:"
printf '%s\n' "${summary[@]}"
exit "$failed"
