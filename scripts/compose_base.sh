#!/usr/bin/env bash
# For machines that reach Debian's and Python's package registries but no image registry (Docker
# Hub) nor PyTorch's index, such as the ones this project is built on:
#  1. the CPU image's base, debian:bookworm, built from Debian's packages (debootstrap, from the
#     mirror apt uses here) and tagged so that `docker build` finds it locally and pulls nothing;
#  2. what pip here is configured with, copied into docker/local/ for the image build: its CA
#     bundle (PIP_CERT or global.cert) and its find-links folder of wheels (the CPU torch).
#   make compose-base        # needs root (debootstrap) and a running Docker engine
# Step 1 is skipped when the tag is already there or can be pulled (FORCE=1 rebuilds it).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${COMPOSE_BASE_TAG:-debian:bookworm}

local_dir=docker/local
cert=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
if [ -n "$cert" ] && [ -f "$cert" ]; then cp "$cert" "$local_dir/ca.crt"; echo "compose-base: pip's CA bundle $cert -> $local_dir/ca.crt"; fi
wheels=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
  mkdir -p "$local_dir/wheels"
  for wheel in "$wheels"/*.whl; do
    [ -e "$wheel" ] || continue
    target="$local_dir/wheels/$(basename "$wheel")"
    [ -e "$target" ] || ln "$wheel" "$target" 2>/dev/null || cp "$wheel" "$target"
  done
  echo "compose-base: pip's find-links $wheels -> $local_dir/wheels ($(ls "$local_dir/wheels" | wc -l) wheels)"
fi

if [ -z "${FORCE:-}" ] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "compose-base: $tag is already there (FORCE=1 rebuilds it)"
  exit 0
fi
if [ -z "${FORCE:-}" ] && docker pull "$tag" >/dev/null 2>&1; then
  echo "compose-base: pulled $tag from the registry"
  exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; }
# deb822 sources (URIs: ...) first, then the one-line format (deb URL suite ...).
mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n 1 || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT
echo "compose-base: debootstrap bookworm from $mirror"
# With what the Dockerfile's apt step installs, so that the step finds it all there.
debootstrap --variant=minbase \
  --include=ca-certificates,python3,python3-venv,python3-dev,g++,libnuma1 \
  bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -n 20 "$rootfs.log"; exit 1; }
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import \
  --change 'CMD ["bash"]' \
  --change 'LABEL org.opencontainers.image.description="Debian bookworm (minbase) built here by debootstrap (scripts/compose_base.sh)"' \
  - "$tag" >/dev/null
echo "compose-base: tagged $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
