#!/usr/bin/env bash
# One process: train RECIPE into OUT (default runs/<recipe file name>); extra flags go to `hymba train`.
#   training/train_cpu.sh configs/gpt_tiny.yaml runs/gpt --steps 300 --data mqar
set -euo pipefail
recipe=${1:?usage: train_cpu.sh RECIPE [OUT] [hymba train flags...]}
shift
out=runs/$(basename "${recipe%.*}")
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then out=$1; shift; fi  # OUT is optional: a flag is not OUT
exec "${HYMBA:-hymba}" train "$recipe" --out "$out" "$@"
