#!/usr/bin/env bash
# N processes on one host (one GPU each; gloo on CPU-only machines) with FSDP2.
#   training/torchrun.sh 2 configs/gpt_tiny.yaml runs/fsdp --steps 1000 --batch-size 16
set -euo pipefail
n=${1:?usage: torchrun.sh N RECIPE [OUT] [hymba train flags...]}
recipe=${2:?usage: torchrun.sh N RECIPE [OUT] [hymba train flags...]}
shift 2
out=runs/$(basename "${recipe%.*}")-x$n
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then out=$1; shift; fi  # OUT is optional: a flag is not OUT
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc-per-node "$n" \
    -m hymba_plus train "$recipe" --out "$out" "$@"
