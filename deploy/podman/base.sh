#!/usr/bin/env bash
# Makes the base image from Debian's packages, for engines with no registry to pull from (Podman here):
# a minimal bookworm (the essential packages: no apt, no perl) with Python 3.11, venv, the C++ runtime (numpy,
# onnxruntime, faiss) and OpenMP's (llama.cpp's CPU backend links libgomp).
# Docs, manuals and translations are left out (path-exclude); copyright files stay.
#
#   deploy/podman/base.sh [IMAGE]      (default localhost/cachecade-base:bookworm; nothing is done if it exists)
#
# Needs root (or podman unshare), mmdebstrap and podman; about 1.5 minutes on 2 cores. Environment:
# DEBIAN_MIRROR (default http://deb.debian.org/debian), CONTAINERS_CONF (the Makefile points it at
# deploy/podman/containers.conf).
set -euo pipefail
image=${1:-localhost/cachecade-base:bookworm}
if podman image exists "$image"; then
    echo "$image exists" >&2
    exit 0
fi
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mmdebstrap --variant=essential --include=python3,python3-venv,libgomp1,libstdc++6 \
    --aptopt='APT::Install-Recommends "false"' --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/*.log' \
    bookworm "$tmp/base.tar" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" "deb $security bookworm-security main"
podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tmp/base.tar" "$image" >/dev/null
podman image ls "$image"
