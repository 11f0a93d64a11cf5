#!/bin/sh
# GPU worker container: with no arguments, run one worker on the container's GPU; with arguments, run them.
# The compose file reserves one GPU per worker service, so inside the container it is always cuda:0.
# The worker reads the rest of its settings (SANA_WORKER_ENGINE, limits, Redis) from the environment itself.
set -eu

# NVIDIA's base images prepare the CUDA environment in their own entrypoint (driver checks, forward
# compatibility libraries): pass through it once, then come back here.
NVIDIA_ENTRYPOINT=${NVIDIA_ENTRYPOINT:-/opt/nvidia/nvidia_entrypoint.sh}
if [ -x "$NVIDIA_ENTRYPOINT" ] && [ -z "${sana_nvidia_entrypoint_done:-}" ]; then
  export sana_nvidia_entrypoint_done=1
  exec "$NVIDIA_ENTRYPOINT" "$0" "$@"
fi

if [ "$#" -gt 0 ]; then
  exec "$@"
fi
exec sana-video worker \
  --model "${SANA_MODEL:?set SANA_MODEL to the model this worker serves}" \
  --device "${SANA_WORKER_DEVICE:-cuda:0}" \
  --precision "${SANA_WORKER_PRECISION:-auto}" \
  --metrics-port "${SANA_WORKER_METRICS_PORT:-9101}"
