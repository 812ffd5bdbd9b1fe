#!/usr/bin/env bash
# What `pip install` needs to compile the forwarding fast path (services/media/fastpath/_fastpath.c): a C
# compiler and OpenSSL's libcrypto headers. Installs them as root when missing; otherwise only says what is missing,
# since Braid still installs and runs without them (on the pure-Python forwarding path).
set -euo pipefail

need=()
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
[ -f /usr/include/openssl/evp.h ] || need+=(libssl-dev)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: ${need[*]} missing; Braid will forward on the pure-Python path (install them and re-run make install for the compiled one)" >&2
    exit 0
  fi
  echo "installing ${need[*]} (to compile the forwarding fast path) ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
