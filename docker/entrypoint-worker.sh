#!/bin/sh
# GPU worker container: with no arguments, run one worker on the container's GPU; with arguments, run them.
# The compose file reserves one GPU per worker service, so inside the container it is always cuda:0.
# SANA_WORKER_ENGINE names a TensorRT engine folder built on this GPU (`sana-video build-engine`), if any.
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
set -- --model "${SANA_MODEL:?set SANA_MODEL to the model this worker serves}" \
  --device "${SANA_WORKER_DEVICE:-cuda:0}" \
  --precision "${SANA_WORKER_PRECISION:-auto}" \
  --metrics-port "${SANA_WORKER_METRICS_PORT:-9101}"
if [ -n "${SANA_WORKER_ENGINE:-}" ]; then
  set -- "$@" --engine "$SANA_WORKER_ENGINE"
fi
exec sana-video worker "$@"
