#!/bin/sh
# GPU worker container: with no arguments, run one worker on the container's GPU; with arguments, run them.
# The compose file reserves one GPU per worker service, so inside the container it is always cuda:0.
set -eu
if [ "$#" -gt 0 ]; then
  exec "$@"
fi
exec sana-video worker \
  --model "${SANA_MODEL:?set SANA_MODEL to the model this worker serves}" \
  --device "${SANA_WORKER_DEVICE:-cuda:0}" \
  --precision "${SANA_WORKER_PRECISION:-auto}" \
  --metrics-port "${SANA_WORKER_METRICS_PORT:-9101}"
