#!/bin/sh
# Runs one command of the image build (docker/Dockerfile) with the extra CA certificates in
# docker/ca-certificates/*.crt trusted besides the system's, for a TLS-intercepting proxy between
# the build and the package indexes. The bundle is a temporary file: the image keeps none of it.
set -eu
dir=$(dirname "$0")/ca-certificates
bundle=$(mktemp)
trap 'rm -f "$bundle"' EXIT
cat /etc/ssl/certs/ca-certificates.crt > "$bundle"
for cert in "$dir"/*.crt; do
    if [ -f "$cert" ]; then cat "$cert" >> "$bundle" && echo >> "$bundle"; fi
done
export PIP_CERT="$bundle" SSL_CERT_FILE="$bundle" REQUESTS_CA_BUNDLE="$bundle"
"$@"
