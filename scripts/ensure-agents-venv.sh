#!/usr/bin/env bash
# A separate virtualenv (.venv-agents) with the real `livekit-agents` framework for the agent tests. It pins its
# own `livekit` rtc version, which need not match the project's, so it gets its own environment. Idempotent: an
# existing, complete environment is left as it is.
set -euo pipefail

VENV="${AGENTS_VENV:-.venv-agents}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed-1.8"

if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import livekit.agents" 2>/dev/null; then
  exit 0
fi
echo "creating $VENV with livekit-agents ..."
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet 'livekit-agents>=1.8,<2' numpy
touch "$STAMP"
