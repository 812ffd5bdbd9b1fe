#!/usr/bin/env bash
# Builds the demo meeting page (web/) into braid/web/meet/, which is committed and shipped in the
# package, so `braid-server --dev` serves the page with no Node.js at run time.
# Needs Node.js 18+ and npm; installs exactly what web/package-lock.json pins.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WEB="$ROOT/web"
OUT="$ROOT/braid/web/meet"

cd "$WEB"
npm ci --no-audit --no-fund --loglevel=error
npx --no-install tsc --noEmit

mkdir -p "$OUT"
npx --no-install esbuild src/meet.ts --bundle --minify --format=esm --target=es2020 \
  --log-level=warning --outfile="$OUT/meet.js"
npx --no-install esbuild src/meet.css --minify --log-level=warning --outfile="$OUT/meet.css"
cp index.html "$OUT/index.html"
echo "built $(cd "$ROOT" && ls braid/web/meet/* | tr '\n' ' ')"
