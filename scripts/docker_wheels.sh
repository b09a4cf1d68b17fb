#!/usr/bin/env bash
# A local wheel set for the Dockerfile: torch, torchvision and every dependency of the project
# (with its `cpu` extra), as the host's pip resolves them (this machine's pip configuration, e.g.
# local indexes, applies). The build gets them as an image mounted read-only, no network:
#   bash scripts/docker_wheels.sh out/wheels
#   tar -C out/wheels -c . | docker import - epd-wheels:local
#   docker build --build-arg WHEELS_IMAGE=epd-wheels:local ...
# The torch pins are read from the Dockerfile's TORCH_PACKAGES, so the two cannot drift apart.
# About 20 s from local indexes; 3.0 GB (torch's CUDA build and its nvidia-* libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: docker_wheels.sh OUT_DIR}
py=${PYTHON:-.venv/bin/python}
torch=$(sed -n 's/^ARG TORCH_PACKAGES="\(.*\)"$/\1/p' Dockerfile)
[ -n "$torch" ] || { echo "no ARG TORCH_PACKAGES=\"...\" in the Dockerfile" >&2; exit 1; }
tmp="$out.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
# shellcheck disable=SC2086  # $torch is a list of requirements
"$py" -m pip wheel -q --wheel-dir "$tmp" $torch "setuptools>=77" ".[cpu]" \
  > "$tmp.log" 2>&1 || { tail -30 "$tmp.log"; exit 1; }
rm -f "$tmp.log" "$tmp"/epd_qwen3vl-*.whl  # the project itself is built from source in the image
rm -rf "$out"
mv "$tmp" "$out"
echo "[docker_wheels] $out: $(ls "$out" | wc -l) wheels, $(du -sh "$out" | cut -f1)"
