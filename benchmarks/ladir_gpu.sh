#!/usr/bin/env bash
# The GPU sweep of benchmarks/ladir_reasoning.py behind the README's LaDiR numbers: on a lent H200
# (carry .whl and .whl4: `source benchmarks/gpu_env.sh`), runs in parallel over tasks of growing
# difficulty and denoiser depths, 500 VAE + 2000 flow steps each at batch 64 (8 processes share
# the GPU: ~0.3 s per VAE step each), 16 Euler steps.
# Writes $OUT/ladir_*.json (+ .png) and log_*.txt.
OUT=${OUT:-benchmarks/results/ladir_gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name --format=csv,noheader
VAE=${VAE:-500}; FLOW=${FLOW:-2000}
go() {  # tag, then flags
  local tag=$1; shift
  timeout ${LIMIT:-560} python3 benchmarks/ladir_reasoning.py --device cuda --batch 64 --vae-steps $VAE --flow-steps $FLOW \
    "$@" --out $OUT/ladir_$tag.json > $OUT/log_$tag.txt 2>&1 &
}
go arith1 --task chain_arith --chain-steps 1
go arith2 --task chain_arith --chain-steps 2
go arith3 --task chain_arith --chain-steps 3
go arith3_L4 --task chain_arith --chain-steps 3 --denoiser-layers 4
go ptr1 --task chain_pointer --chain-steps 1
go ptr2 --task chain_pointer --chain-steps 2
go ptr3 --task chain_pointer --chain-steps 3
go ptr3_L4 --task chain_pointer --chain-steps 3 --denoiser-layers 4
wait
for f in $OUT/log_*.txt; do echo "== $f"; tail -n 14 $f; done
