#!/usr/bin/env bash
# The GPU sweep of benchmarks/ladir_reasoning.py behind the README's LaDiR numbers: on a lent H200
# (carry .whl for dacite: `source benchmarks/gpu_env.sh`), runs in parallel over three tasks, LaDiR
# (300 VAE + 1200 flow steps, batch 64, 16 Euler steps) and the direct baseline as separate processes.
# Writes $OUT/ladir_*.json (+ .png) and log_*.txt.
OUT=${OUT:-benchmarks/results/ladir_gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name --format=csv,noheader
VAE=${VAE:-300}; FLOW=${FLOW:-1200}
export HYMBA_KERNELS=${HYMBA_KERNELS:-reference}  # tiny shapes: the reference ops launch less than fla's
go() {  # tag, then flags
  local tag=$1; shift
  timeout ${LIMIT:-560} python3 benchmarks/ladir_reasoning.py --device cuda --batch 64 --vae-steps $VAE --flow-steps $FLOW \
    "$@" --out $OUT/ladir_$tag.json > $OUT/log_$tag.txt 2>&1 &
}
for spec in "arith1 chain_arith 1" "arith2 chain_arith 2" "ptr1 chain_pointer 1"; do
  set -- $spec
  go $1 --task $2 --chain-steps $3 --part ladir
  go ${1}_direct --task $2 --chain-steps $3 --part direct
done
wait
for f in $OUT/log_*.txt; do echo "== $f"; tail -n 14 $f; done
