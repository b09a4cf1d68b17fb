# One image for every process of the cluster: epd-encode, epd-language, epd-make-tiny-model,
# epd-keys, the benchmarks, epd-demo. Installs the project the way scripts/setup.sh does.
# Needs BuildKit (the default of Docker >= 23 and of `docker compose`; DOCKER_BUILDKIT=1 before).
#
# CPU (default; Mooncake over TCP):
#   docker build -t epd-qwen3vl .
# GPU nodes (CUDA build of Mooncake; never both builds in one image). Use a CUDA 12 runtime base
# image (Mooncake's CUDA build links libcudart.so.12; torch brings CUDA 13's own) with Python
# >= 3.10 (installed below when the base image has none). Not built here (no GPU machine):
#   docker build -t epd-qwen3vl:gpu --build-arg EXTRAS=gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 .
# A smaller CPU-only image (torch and torchvision both from PyTorch's CPU index; not tried here,
# that index is unreachable from these machines):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Without a registry (tests/e2e/test_compose.py does this): a Debian base image made by
# scripts/docker_base.sh, and every Python package from a local wheel directory made by
# scripts/docker_wheels.sh, served to the build over HTTP (pip --find-links, no index):
#   docker import base.tar epd-base:bookworm
#   python3 -m http.server -d WHEEL_DIR 8765 &
#   docker build -t epd-qwen3vl --network host --build-arg BASE_IMAGE=epd-base:bookworm \
#     --build-arg WHEELS=http://127.0.0.1:8765/ .
#
# Layers, cheapest to rebuild last: system packages and user; the virtual environment with
# torch and every dependency (from pyproject.toml alone, so a source change does not reinstall
# torch); the project itself. Few layers on purpose: a storage driver such as vfs copies the whole
# file system for each one.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG EXTRAS=cpu
ARG TORCH_PACKAGES="torch==2.14.1 torchvision==0.29.1"
# Where torch comes from when no wheels are given (empty: PyPI, as setup.sh does).
ARG TORCH_INDEX_URL=
# pip --find-links for every Python package, with no index (a URL or a path): empty, the index.
ARG WHEELS=
ARG DEBIAN_FRONTEND=noninteractive

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MC_LOG_LEVEL=ERROR

# The libraries Mooncake's transfer engine links against even for TCP (python:3.11-slim lacks
# libnuma and libcurl too; the CUDA build also needs libmlx5); Python and its venv module where
# the base image lacks them (Debian and CUDA bases). apt only runs if something is missing.
# A non-root user; /models (the compose file's shared volume) belongs to it.
RUN set -eux; \
    pkgs=""; \
    libs="libibverbs.so.1:libibverbs1 libnl-3.so.200:libnl-3-200 libnuma.so.1:libnuma1"; \
    libs="$libs libnl-route-3.so.200:libnl-route-3-200 libcurl.so.4:libcurl4"; \
    [ "$EXTRAS" != gpu ] || libs="$libs libmlx5.so.1:ibverbs-providers"; \
    for lib in $libs; do \
        ldconfig -p | grep -q "${lib%%:*}" || pkgs="$pkgs ${lib#*:}"; \
    done; \
    command -v python3 >/dev/null || pkgs="$pkgs python3"; \
    python3 -c 'import ensurepip, venv' 2>/dev/null || pkgs="$pkgs python3-venv"; \
    if [ -n "$pkgs" ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends $pkgs; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    useradd --create-home epd; \
    mkdir -p /models; \
    chown epd:epd /models
# Here, not last: BuildKit makes a layer for WORKDIR (with vfs, a full copy of the file system).
WORKDIR /home/epd

# torch and every dependency, from pyproject.toml alone (without its readme line: README.md is
# not mounted, so README edits keep this layer). It installs an empty epd-qwen3vl, which the
# next layer replaces.
RUN --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    set -eux; \
    case "$EXTRAS" in cpu|gpu) ;; *) echo "EXTRAS must be cpu or gpu" >&2; exit 1;; esac; \
    if [ -n "$WHEELS" ]; then \
        src="--no-index --find-links $WHEELS"; torch_src="$src"; \
    else \
        src=""; torch_src="${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL}"; \
    fi; \
    python3 -m venv "$VIRTUAL_ENV"; \
    pip install $torch_src $TORCH_PACKAGES; \
    mkdir /tmp/deps; \
    sed '/^readme *=/d' /tmp/pyproject.toml > /tmp/deps/pyproject.toml; \
    pip install $src "setuptools>=77" "/tmp/deps[$EXTRAS]"; \
    rm -rf /tmp/deps

# The project: the build context mounted (writable, writes discarded), never copied into a layer.
# Mooncake's CUDA build imports only where the driver is (at run time, not in the build).
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --no-deps --no-build-isolation --force-reinstall /src \
    && python -c "import encode_server.cli, language_server.cli, epd.tiny_model" \
    && { [ "$EXTRAS" = gpu ] || python -c "import mooncake.engine"; }

USER epd

# 8000: language HTTP; 7001/7002: encode servers (ZeroMQ). Mooncake picks its own RPC ports.
EXPOSE 8000 7001 7002
CMD ["epd-language", "--help"]
