#!/usr/bin/env bash
# What the browser tests (tests/test_browser.py) need beyond the Python test extra:
#   - Chromium from Debian (/usr/bin/chromium); Playwright's own browser download is not used.
# Playwright itself is the Python package in the `test` extra (it carries its own Node.js driver).
# Idempotent: installs only what is missing, so `make test` can call it on every run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHROMIUM="${BRAID_CHROMIUM:-/usr/bin/chromium}"

if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: $CHROMIUM; install Debian's chromium (for example: sudo apt-get install chromium)" >&2
    exit 1
  fi
  echo "installing chromium ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
