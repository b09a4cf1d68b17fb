# One image for every process of the cluster: epd-encode, epd-language, epd-make-tiny-model,
# epd-bench-transfer, epd-demo. Installs the project the way scripts/setup.sh does.
#
# CPU (default; Mooncake over TCP):
#   docker build -t epd-qwen3vl .
# GPU nodes (CUDA build of Mooncake; never both builds in one image). Use a CUDA 12 runtime
# base image; it needs Python >= 3.10 (installed below when the base image has none):
#   docker build -t epd-qwen3vl:gpu --build-arg EXTRAS=gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 .
# TORCH_INDEX_URL picks where torch comes from (empty: PyPI, as setup.sh does); for a smaller
# CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG EXTRAS=cpu
ARG TORCH_INDEX_URL=
ARG DEBIAN_FRONTEND=noninteractive

# The libraries Mooncake's transfer engine links against even for TCP (and Python on CUDA bases).
RUN set -eux; \
    pkgs="libibverbs1 libnl-3-200 libnl-route-3-200"; \
    command -v python3 >/dev/null || pkgs="$pkgs python3 python3-venv"; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MC_LOG_LEVEL=ERROR

# torch first (its own layer: it is by far the largest and changes least), pinned as in setup.sh.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip \
    && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        torch==2.14.1 torchvision==0.29.1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY transfer ./transfer
COPY encode_server ./encode_server
COPY language_server ./language_server
COPY epd ./epd
COPY benchmarks ./benchmarks
RUN case "$EXTRAS" in cpu|gpu) ;; *) echo "EXTRAS must be cpu or gpu" >&2; exit 1;; esac \
    && pip install ".[$EXTRAS]" \
    && python -c "import encode_server.cli, language_server.cli, epd.tiny_model"

# Run as a non-root user; /models (the compose file's shared volume) belongs to it.
RUN useradd --create-home epd && mkdir -p /models && chown epd:epd /models
USER epd
WORKDIR /home/epd

# 8000: language HTTP; 7001/7002: encode servers (ZeroMQ). Mooncake picks its own RPC ports.
EXPOSE 8000 7001 7002
CMD ["epd-language", "--help"]
