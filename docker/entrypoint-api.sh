#!/bin/sh
# API container: with no arguments, serve the API; with arguments, run them (e.g. `sh` for a look around).
set -eu
if [ "$#" -gt 0 ]; then
  exec "$@"
fi
exec sana-video api --host "${SANA_HOST:-0.0.0.0}" --port "${SANA_PORT:-8000}"
