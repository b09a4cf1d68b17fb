#!/usr/bin/env bash
# A Debian bookworm base image without a container registry: debootstrap builds a minimal root
# file system from Debian's packages (python3 and its venv module, like python:3.11-slim), and
# this writes it as a tar file that `docker import` turns into an image:
#   bash scripts/docker_base.sh out/base.tar && docker import out/base.tar epd-base:bookworm
# Needs root and debootstrap (scripts/setup.sh installs it). About 40 s and 100 MB of downloads;
# the tar is about 290 MB. DEBIAN_MIRROR picks the mirror (default deb.debian.org).
set -euo pipefail
out=${1:?usage: docker_base.sh OUT.tar}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-venv,ca-certificates
root=$(mktemp -d "${TMPDIR:-/tmp}/epd-base.XXXXXX")
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" \
  > "$root.log" 2>&1 || { tail -30 "$root.log"; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# Nothing a container needs: downloaded .debs and package lists (apt-get update refetches them).
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
chmod 755 "$root"  # mktemp made it 0700: it becomes the image's /, which every user must traverse
mkdir -p "$(dirname "$out")"
tar --numeric-owner --sort=name -C "$root" -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "[docker_base] $out: $(du -h "$out" | cut -f1) ($packages on Debian bookworm)"
