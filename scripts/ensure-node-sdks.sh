#!/usr/bin/env bash
# The official Node SDKs (@livekit/rtc-node, livekit-server-sdk) for tests/test_node_sdks.py, installed exactly as
# tests/node/package-lock.json pins them. Idempotent: an install that matches the lock file is left as it is.
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../tests/node" && pwd)"
STAMP="$DIR/node_modules/.installed"

if ! command -v npm >/dev/null 2>&1; then
  echo "the Node SDK tests need Node.js 18+ and npm" >&2
  exit 1
fi
if [ -f "$STAMP" ] && [ "$STAMP" -nt "$DIR/package-lock.json" ]; then
  exit 0
fi
echo "installing the Node SDKs into tests/node ..."
(cd "$DIR" && npm ci --no-audit --no-fund --loglevel=error)
touch "$STAMP"
