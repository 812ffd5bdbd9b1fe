#!/usr/bin/env bash
# System packages the tests need that pip cannot provide. Idempotent; installs only what is missing.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v turnserver >/dev/null 2>&1 || need+=(coturn)  # TURN tests: coturn started on loopback
command -v iptables >/dev/null 2>&1 || need+=(iptables)  # ICE-TCP test: a network namespace without UDP
command -v openssl >/dev/null 2>&1 || need+=(openssl)  # test certificate for TURN over TLS

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${need[*]}; install them (for example: sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "installing ${need[*]} ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
