#!/usr/bin/env bash
# Makes a throw-away TLS setup for tests, demos and benchmarks in DIR (never commit its keys):
#   ca.pem / ca.key          a test CA
#   server.pem / server.key  a server certificate for localhost and 127.0.0.1, signed by the CA
#   server2.pem / server2.key  another one (for reload tests)
#   client.pem / client.key  a client certificate (mutual TLS), signed by the CA
#   other.key                a key that matches none of the certificates
# Usage: scripts/make-test-certs.sh DIR [ec|rsa]   (ec: P-256, the default; rsa: 2048 bits)
set -euo pipefail
dir=${1:?usage: make-test-certs.sh DIR [ec|rsa]}
kind=${2:-ec}
mkdir -p "$dir"
cd "$dir"
case "$kind" in
  ec) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) ;;
  rsa) newkey=(-newkey rsa:2048) ;;
  *) echo "make-test-certs.sh: key kind is ec or rsa, not '$kind'" >&2; exit 2 ;;
esac
quiet() { "$@" 2>/dev/null || { "$@"; exit 1; }; }
quiet openssl req -x509 "${newkey[@]}" -nodes -keyout ca.key -out ca.pem -days 7 \
  -subj "/CN=pushbook test CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign"
sign() {  # name, subject, extensions
  quiet openssl req "${newkey[@]}" -nodes -keyout "$1.key" -out "$1.csr" -subj "$2"
  printf '%s\n' "$3" >"$1.ext"
  quiet openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$1.pem" -days 7 \
    -extfile "$1.ext"
  rm -f "$1.csr" "$1.ext"
}
server_ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
sign server "/CN=localhost" "$server_ext"
sign server2 "/CN=localhost (renewed)" "$server_ext"
sign client "/CN=test-client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out other.key
rm -f ca.srl
chmod 600 ./*.key
