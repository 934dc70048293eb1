#!/bin/sh
# Entrypoint of the worker image. For `worker`, claim free GPU(s) first so that
# every replica of `docker compose up --scale worker=N` gets its own GPU (see
# docker/gpu_claim.py for why Docker cannot do this itself); then run egm-assist.
# Every other subcommand (status, prelabel, ...) runs unchanged.
set -eu

# gpu_claim.py sits next to this script (/opt/egm in the image, docker/ in the repository).
claim="python3 $(dirname "$0")/gpu_claim.py"

# A CUDA_VISIBLE_DEVICES set by hand pins the worker and skips the claim.
if [ "${1:-}" = "worker" ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    per_replica="${WORKER_GPUS_PER_REPLICA:-${EGM_VLLM_TENSOR_PARALLEL_SIZE:-1}}"
    indices="$($claim claim --count "$per_replica" --only "${WORKER_GPU_IDS:-}")" || exit $?
    if [ -n "$indices" ]; then
        export CUDA_VISIBLE_DEVICES="$indices"
        echo "entrypoint: this worker uses GPU(s) $indices" >&2
        # Keeps the claim alive while the worker runs ($$ becomes the worker's pid at exec).
        $claim hold --indices "$indices" --parent $$ &
    fi
fi

exec egm-assist "$@"
