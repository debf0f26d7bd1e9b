#!/usr/bin/env bash
# A Debian base image with Python and venv, made locally with debootstrap: for hosts that reach
# Debian's mirrors and PyPI but no image registry. Build the app on it with
#   podman build -f docker/Dockerfile --build-arg BASE_IMAGE=localhost/debian-python:bookworm ...
# Usage (root): docker/debian-base.sh [IMAGE]      (default localhost/debian-python:bookworm)
# Environment: SUITE (bookworm: Python 3.11, which the app supports), MIRROR (default: the host's
# first Debian apt source), ENGINE (podman; docker works too).
set -euo pipefail
image=${1:-localhost/debian-python:bookworm}
suite=${SUITE:-bookworm}
engine=${ENGINE:-podman}
if [ -z "${MIRROR:-}" ]; then
    MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -oE '(^deb|^URIs:)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+' \
        | grep -oE 'https?://[^[:space:]]+' | grep -v -- '-security' | head -n 1 || true)
fi
if [ -z "${MIRROR:-}" ]; then
    echo "no Debian mirror found in /etc/apt/sources.list*: set MIRROR=http://..." >&2
    exit 2
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$rootfs" "$MIRROR" >&2
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "$engine" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$image" >/dev/null
echo "$image: Debian $suite from $MIRROR"
