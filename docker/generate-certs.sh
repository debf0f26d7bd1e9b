#!/usr/bin/env bash
# Make the TLS material and SuperNode keys of a Plateau federation:
#   <out>/ca.crt, ca.key            a self-signed certificate authority
#   <out>/server.pem, server.key    the SuperLink's certificate, for the names in SAN
#   <out>/keys/supernode-<i>[.pub]  one ECDSA P-384 key pair (OpenSSH format) per SuperNode
# Usage: docker/generate-certs.sh [out-dir]   (env: NODES=2, SAN=DNS:localhost,DNS:superlink,IP:127.0.0.1, DAYS=365)
set -euo pipefail
out=${1:-certs}
nodes=${NODES:-2}
san=${SAN:-DNS:localhost,DNS:superlink,IP:127.0.0.1}
days=${DAYS:-365}
mkdir -p "$out/keys"
openssl req -x509 -new -nodes -newkey rsa:4096 -sha256 -days "$days" \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=Plateau federation CA" 2>/dev/null
openssl req -new -nodes -newkey rsa:4096 -sha256 \
    -keyout "$out/server.key" -out "$out/server.csr" -subj "/CN=superlink" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -out "$out/server.pem" -days "$days" -sha256 -extfile "$out/server.ext" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext"
for i in $(seq 1 "$nodes"); do
    [ -f "$out/keys/supernode-$i" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" \
        -f "$out/keys/supernode-$i"
done
chmod 600 "$out/ca.key" "$out/server.key" "$out"/keys/supernode-*[0-9]
echo "wrote $out/{ca.crt,server.pem,server.key} and $nodes SuperNode key pair(s) in $out/keys"
