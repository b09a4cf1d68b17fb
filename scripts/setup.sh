#!/usr/bin/env bash
# One-shot, idempotent set-up on a fresh Debian machine with Python 3.11:
#   - the Debian libraries Mooncake's transfer engine links against (even for TCP),
#   - a virtual environment in .venv with torch/torchvision pinned (CPU use; see README),
#   - this project with its test extras and Mooncake's CPU build.
# Re-running it is cheap: every step checks whether it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

# Debian packages: the libraries Mooncake links against even for TCP; for the tests,
# docker-compose (validates docker-compose.yml), docker.io + debootstrap (the compose test runs
# its own dockerd and builds a Debian base image without a registry), and iproute2 + iptables +
# curl (the two-host test builds network namespaces, degrades the link between them, and runs
# the README's client commands).
need_apt=()
libs=$(ldconfig -p)  # not piped into grep -q: with pipefail, SIGPIPE would read as "missing"
for lib in libibverbs.so.1 libnl-3.so.200 libnl-route-3.so.200; do
  grep -q "$lib" <<<"$libs" || need_apt+=("$lib")
done
command -v docker-compose >/dev/null || need_apt+=(docker-compose)
command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || need_apt+=(iptables)
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || need_apt+=(iproute2)
[ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || need_apt+=(docker.io)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ] && [ "${EPD_SKIP_APT:-0}" != 1 ]; then
  echo "[setup] installing Debian packages (missing: ${need_apt[*]})"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    libibverbs1 libnl-3-200 libnl-route-3-200 docker-compose iptables iproute2 \
    docker.io debootstrap curl >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1 (about 2 minutes)"
  $PIP install -q --upgrade pip
  $PIP install -q torch==2.14.1 torchvision==0.29.1
fi
stamp="$VENV/.epd-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing the project and its test tools (log: $VENV/pip-install.log)"
  if ! $PIP install -e ".[test]" > "$VENV/pip-install.log" 2>&1; then
    tail -40 "$VENV/pip-install.log"; exit 1
  fi
  echo "$want" > "$stamp"
fi
if [ "${EPD_SKIP_SGLANG:-0}" != 1 ]; then
  echo "[setup] SGLang 0.5.23 for --engine sglang and tests/sglang (CPU build, --no-deps)"
  VENV="$VENV" bash scripts/setup_sglang.sh
fi
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, transformers, mooncake; print("torch", torch.__version__, "transformers", transformers.__version__)')"
